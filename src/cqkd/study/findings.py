"""The paper's findings as effects over a sweep's runs."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cqkd.core.config import CONFIG_KEYS

# config keys that never tell two settings apart (hardware, paths, loaders)
_NOT_SETTING = {"data_dir", "accelerator", "devices", "strategy", "num_nodes", "precision", "num_workers",
                "teacher_cache", "seed"}


CORRELATION_FLOOR = 0.3


RULE = ("*holds*: the effect has the paper's sign and |mean| > 2 × its std over seeds; "
        "*does not hold*: the opposite sign and |mean| > 2 × std; *inconclusive*: otherwise, "
        "or fewer than 2 seeds. A correlation must also have |mean| > 0.3 to count either way; "
        "one with |mean| + 2 × std < 0.3 is reported as *does not hold (no relation)*.")


def mean_std(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None and not math.isnan(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 3:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    return pearson(_ranks(x), _ranks(y))


def verdict(mean: float, std: float, n: int, expected_sign: int, floor: float = 0.0) -> str:
    """The stated rule (``RULE``). ``floor`` is the smallest |effect| that counts as one (used for
    correlations: a consistent r of 0.03 is no relation, not a relation of the opposite sign)."""
    if n < 2 or math.isnan(mean) or math.isnan(std):
        return "inconclusive (fewer than 2 seeds)" if n < 2 else "inconclusive"
    if abs(mean) > 2 * std and abs(mean) > floor:
        return "holds" if mean * expected_sign > 0 else "does not hold"
    if floor and abs(mean) + 2 * std < floor:
        return f"does not hold (no relation: abs(r) < {floor:g})"
    return "inconclusive"


def _f(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _varying(rows: list[dict[str, Any]], exclude: set[str]) -> list[str]:
    keys = []
    for k in CONFIG_KEYS:
        if k in exclude or k in _NOT_SETTING:
            continue
        if len({repr(r.get(k)) for r in rows}) > 1:
            keys.append(k)
    return keys


@dataclass
class Series:
    """Runs that differ only in temperature, teacher calibration and seed (e.g. one input size)."""

    key: tuple
    label: str
    size: int
    model: str
    rows: list[dict[str, Any]]


def distill_series(rows: list[dict[str, Any]]) -> list[Series]:
    done = [r for r in rows if r["role"] == "distill" and r["state"] == "finished"]
    vary = _varying(done, {"temperature", "teacher_calibration", "kind"})
    if "size" not in vary:
        vary = ["size", *vary]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        groups[tuple(r.get(k) for k in vary)].append(r)
    series = []
    for key, rs in groups.items():
        label = ", ".join(f"{k}={_short(r_val)}" for k, r_val in zip(vary, key))
        series.append(Series(key, label, int(rs[0]["size"]), rs[0]["model"], rs))
    series.sort(key=lambda s: (-s.size, s.label))
    return series


def _short(v: Any) -> str:
    if isinstance(v, str) and ("/" in v or os.sep in v):
        return Path(v).name
    return f"{v:g}" if isinstance(v, float) else str(v)


def setting_of(row: dict[str, Any]) -> tuple[str, str]:
    """(temperature as configured, teacher calibration): 'calibrated' or the number."""
    t = row.get("temperature")
    t_text = "calibrated" if t == "calibrated" else f"{float(t):g}"
    return t_text, str(row.get("teacher_calibration"))


def settings_table(s: Series) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each (T, teacher calibration) setting of a series."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in s.rows:
        by[setting_of(r)].append(r)
    out = []
    for (t, tcal), rs in by.items():
        entry: dict[str, Any] = {"T": t, "tcal": tcal, "rows": rs, "n": len(rs)}
        for key in ("top1", "ece", "entropy", "best_val_top1", "temperature_used", "t_cal", "nll", "flops"):
            entry[key] = mean_std([_f(r, key) for r in rs])
        out.append(entry)
    out.sort(key=lambda e: (e["tcal"], e["T"] == "calibrated", float(e["T"]) if e["T"] != "calibrated" else 0.0))
    return out


def supervised_for(rows: list[dict[str, Any]], size: int, model: str | None = None) -> list[dict[str, Any]]:
    sup = [r for r in rows if r["role"] == "supervised" and r["state"] == "finished" and int(r["size"]) == size]
    same_model = [r for r in sup if r.get("model") == model]
    return same_model or sup


def _by_seed(rows: list[dict[str, Any]], key: str) -> dict[int, float]:
    out = {}
    for r in rows:
        v = _f(r, key)
        if v is not None:
            out[int(r["seed"])] = v
    return out


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three findings, measured per series; each entry has mean, std, n and a verdict."""
    result = []
    for s in distill_series(rows):
        table = settings_table(s)
        # finding 1: best-by-val CQKD setting vs supervised, paired by seed
        sup = supervised_for(rows, s.size, s.model)
        if table and sup:
            best = max(table, key=lambda e: (e["best_val_top1"][0] if not math.isnan(e["best_val_top1"][0]) else -1))
            kd, base = _by_seed(best["rows"], "top1"), _by_seed(sup, "top1")
            diffs = [kd[k] - base[k] for k in sorted(set(kd) & set(base))]
            m, sd, n = mean_std(diffs)
            result.append(dict(finding=1, series=s.label, what=f"top-1 CQKD (T={best['T']}, tcal={best['tcal']}; "
                                                                 "best by val) − supervised",
                               mean=m, std=sd, n=n, verdict=verdict(m, sd, n, +1)))
        # finding 2: within each seed, over the fixed temperatures with an uncalibrated teacher
        fixed = [r for r in s.rows if r.get("temperature") != "calibrated" and r.get("teacher_calibration") == "none"]
        per_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in fixed:
            per_seed[int(r["seed"])].append(r)
        n_t = max((len({_f(r, "temperature_used") for r in rs}) for rs in per_seed.values()), default=0)
        if per_seed and n_t < 3:
            result.append(dict(finding=2, series=s.label, what="correlations over T", mean=math.nan, std=math.nan,
                               n=0, verdict=f"inconclusive (needs ≥ 3 fixed temperatures; has {n_t})"))
            per_seed = {}
        for what, fx, fy, sign, func in (
            ("Spearman ρ(T, entropy)", "temperature_used", "entropy", +1, spearman),
            ("Pearson r(entropy, ECE)", "entropy", "ece", -1, pearson),
            ("Pearson r(entropy, top-1)", "entropy", "top1", +1, pearson),
        ):
            vals = []
            for rs in per_seed.values():
                pts = [(_f(r, fx), _f(r, fy)) for r in rs]
                pts = [(a, b) for a, b in pts if a is not None and b is not None]
                vals.append(func([a for a, _ in pts], [b for _, b in pts]))
            m, sd, n = mean_std(vals)
            if per_seed:
                result.append(dict(finding=2, series=s.label, what=what, mean=m, std=sd, n=n,
                                   verdict=verdict(m, sd, n, sign, floor=CORRELATION_FLOOR)))
        # finding 3: calibrated − uncalibrated teacher at matched fixed T
        cal = {(setting_of(r)[0], int(r["seed"])): r for r in s.rows
               if r.get("teacher_calibration") == "temperature" and r.get("temperature") != "calibrated"}
        unc = {(setting_of(r)[0], int(r["seed"])): r for r in fixed}
        matched = sorted(set(cal) & set(unc))
        if matched:
            for what, key, sign in (("top-1 calibrated − uncalibrated teacher", "top1", +1),
                                    ("ECE calibrated − uncalibrated teacher", "ece", -1)):
                seeds: dict[int, list[float]] = defaultdict(list)
                for t, seed in matched:
                    a, b = _f(cal[(t, seed)], key), _f(unc[(t, seed)], key)
                    if a is not None and b is not None:
                        seeds[seed].append(a - b)
                m, sd, n = mean_std([sum(v) / len(v) for v in seeds.values() if v])
                ts = sorted({t for t, _ in matched}, key=float)
                result.append(dict(finding=3, series=s.label, what=f"{what} (T ∈ {{{', '.join(ts)}}})",
                                   mean=m, std=sd, n=n, verdict=verdict(m, sd, n, sign)))
    result.sort(key=lambda f: f["finding"])
    return result


def calibration_pairs(s: Series) -> list[dict[str, Any]]:
    """Per fixed T present with and without teacher calibration: both sides and the paired
    (same seed) differences calibrated − uncalibrated of top-1 and ECE, mean ± std over seeds."""
    cal: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    unc: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in s.rows:
        if r.get("temperature") == "calibrated":
            continue
        side = cal if r.get("teacher_calibration") == "temperature" else unc
        side[setting_of(r)[0]][int(r["seed"])] = r
    out = []
    for t in sorted(set(cal) & set(unc), key=float):
        seeds = sorted(set(cal[t]) & set(unc[t]))
        if not seeds:
            continue
        entry: dict[str, Any] = {"T": t, "n": len(seeds)}
        for key in ("top1", "ece"):
            a = [_f(cal[t][k], key) for k in seeds]
            b = [_f(unc[t][k], key) for k in seeds]
            entry[f"{key}_cal"] = mean_std(a)
            entry[f"{key}_unc"] = mean_std(b)
            entry[f"{key}_diff"] = mean_std([x - y for x, y in zip(a, b) if x is not None and y is not None])
        out.append(entry)
    return out
