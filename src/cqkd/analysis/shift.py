"""Reading ``shift.csv`` files: mean corruption error against a baseline, the shift figure, and
the comparison of groups of runs (teacher, supervised, CQKD) with intervals over seeds."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap

from cqkd.core.io import atomic_write
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError

SHIFT_FILE = "shift.csv"
_NUMBERS = ("parameter", "n", "top1", "nll", "ece", "entropy", "t_cal", "nll_cal", "ece_cal", "entropy_cal")


def read_shift(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``shift.csv`` (a run directory or the file), numbers as floats."""
    file = Path(path)
    file = file / SHIFT_FILE if file.is_dir() else file
    if not file.is_file():
        raise CqkdError(f"{str(file)!r} does not exist: run `cqkd evaluate RUN --shift` first")
    with open(file, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "corruption" not in rows[0] or "severity" not in rows[0]:
        raise CqkdError(f"{str(file)!r} is not a cqkd shift.csv")
    out = []
    for r in rows:
        row: dict[str, Any] = {"corruption": r["corruption"], "severity": int(r["severity"])}
        for k in _NUMBERS:
            row[k] = float(r[k]) if r.get(k) not in (None, "") else None
        out.append(row)
    return out


def _errors(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """{corruption: {severity: top-1 error}} (the clean row under ``none``, severity 0)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["corruption"], {})[r["severity"]] = 1.0 - float(r["top1"])
    return out


def corruption_errors(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """ImageNet-C's corruption error per corruption c (Hendrycks & Dietterich, ICLR 2019):

    CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, and relative CE_c = sum_s (E_{s,c} - E_clean) /
    sum_s (E^base_{s,c} - E^base_clean), over the severities s both runs have; E = 1 - top-1.
    Returns ``{c: {"ce", "relative_ce"}}`` plus ``"mean"`` (mCE, relative mCE: the means over the c where
    they are defined; NaN where the baseline's error does not grow over clean)."""
    mine, base = _errors(rows), _errors(baseline)
    out: dict[str, dict[str, float]] = {}
    clean, base_clean = mine.get("none", {}).get(0), base.get("none", {}).get(0)
    for c, by_s in mine.items():
        if c == "none" or c not in base:
            continue
        sev = sorted(set(by_s) & set(base[c]))
        if not sev:
            continue
        num, den = sum(by_s[s] for s in sev), sum(base[c][s] for s in sev)
        ce = num / den if den > 0 else float("nan")
        rel = float("nan")
        if clean is not None and base_clean is not None:
            rden = sum(base[c][s] - base_clean for s in sev)
            rel = sum(by_s[s] - clean for s in sev) / rden if rden > 0 else float("nan")
        out[c] = {"ce": ce, "relative_ce": rel}
    if not out:
        raise CqkdError("no corruption in common with the baseline's shift.csv: cannot compute mCE")
    means = {}
    for k in ("ce", "relative_ce"):  # over the corruptions where it is defined (a baseline no worse than clean: NaN)
        vals = [v[k] for v in out.values() if not math.isnan(v[k])]
        means[k] = float(np.mean(vals)) if vals else float("nan")
    out["mean"] = means
    return out


def shift_figure(entries: list[tuple[str, list[dict[str, Any]]]], path: str | os.PathLike) -> Path:
    """Top-1 and ECE against severity, one panel pair per corruption, the runs overlaid (PNG)."""
    import matplotlib  # pyplot gets the Agg backend when a figure is drawn, not at import (the user's backend is left alone)

    matplotlib.use("Agg", force=False)  # matplotlib: imported only when a figure is drawn
    import matplotlib.pyplot as plt

    names = [c for c in dict.fromkeys(r["corruption"] for _, rows in entries for r in rows) if c != "none"]
    if not names:
        raise CqkdError("the shift.csv files hold no corruption rows to plot")
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), squeeze=False, sharex=True)
    for j, c in enumerate(names):
        for label, rows in entries:
            clean = [r for r in rows if r["corruption"] == "none"]
            pts = sorted(clean + [r for r in rows if r["corruption"] == c], key=lambda r: r["severity"])
            xs = [r["severity"] for r in pts]
            for i, key in enumerate(("top1", "ece")):
                axes[i][j].plot(xs, [r[key] for r in pts], marker="o", label=label)
        axes[0][j].set_title(c)
        axes[1][j].set_xlabel("severity (0 = clean)")
    axes[0][0].set_ylabel("test top-1")
    axes[1][0].set_ylabel("ECE (15 bins)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), mode="wb")
    finally:
        plt.close(fig)
    return out


def seed_of(path: str | os.PathLike) -> int:
    """The seed in a run directory's config.yaml."""
    return int(RunDir(path).config().seed)


def interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (scipy), the value itself for one seed."""
    if len(values) < 2 or np.allclose(values, values[0]):
        return float(values.mean()), float(values.mean())

    res = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def compare_groups(groups: dict[str, list[str]], reference: str, metrics: tuple[str, ...] = ("top1", "ece"),
                   severities: tuple[int, ...] = (0, 1, 3, 5)) -> list[dict[str, Any]]:
    """Per corruption x severity x metric: each group's mean over its runs (seeds), and its
    difference to ``reference`` paired by seed (runs with the same seed), with a 95% bootstrap
    interval over the seeds (a group of one run, e.g. the teacher, against every reference seed).
    ``groups`` maps a label to run directories holding shift.csv."""
    if reference not in groups:
        raise CqkdError(f"reference group {reference!r} is not one of {', '.join(groups)}")
    tables = {g: {seed_of(p): read_shift(p) for p in paths} for g, paths in groups.items()}
    out = []
    for r0 in next(iter(tables[reference].values())):
        c, s = r0["corruption"], r0["severity"]
        if s not in severities:
            continue
        for m in metrics:
            row: dict[str, Any] = {"corruption": c, "severity": s, "metric": m}
            ref = {seed: _value(t, c, s, m) for seed, t in tables[reference].items()}
            for g, by_seed in tables.items():
                vals = {seed: _value(t, c, s, m) for seed, t in by_seed.items()}
                v = np.array([x for x in vals.values() if x is not None])
                row[g] = float(v.mean()) if len(v) else None
                if g != reference:
                    if len(vals) == 1:  # one run (a teacher): against every seed of the reference
                        only = next(iter(vals.values()))
                        paired = [only - x for x in ref.values() if only is not None and x is not None]
                    else:
                        paired = [vals[k] - ref[k] for k in vals if k in ref and vals[k] is not None
                                  and ref[k] is not None]
                    d = np.array(paired)
                    row[f"{g}-{reference}"] = float(d.mean()) if len(d) else None
                    row[f"{g}-{reference} CI"] = interval(d) if len(d) else None
                    row[f"{g} seeds"] = len(d)
            out.append(row)
    return out


def _value(rows: list[dict[str, Any]], c: str, s: int, m: str) -> float | None:
    for r in rows:
        if r["corruption"] == c and r["severity"] == s:
            return r.get(m)
    return None
