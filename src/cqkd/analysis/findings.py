"""The paper's findings as effects over a sweep's runs."""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqkd.analysis import stats
from cqkd.core.config import CONFIG_KEYS
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError
from cqkd.views.degrade import Degradation

# config keys that never tell two settings apart (hardware, paths, loaders)
_NOT_SETTING = {"data_dir", "accelerator", "devices", "strategy", "num_nodes", "precision", "num_workers",
                "teacher_cache", "seed"}


RULE = ("*holds*: the 95% bootstrap CI of the effect (resampling seeds and test images) excludes 0 on the "
        "paper's side; *reverses*: it excludes 0 on the other side; *inconclusive*: otherwise, and then "
        "*detectable* gives the smallest effect this design would find with 80% power (2.8 × the bootstrap "
        "standard error). p: two-sided paired t-test over seeds. Trends over T and correlations: Spearman ρ / "
        "Pearson r with a permutation p-value (T permuted within seeds); *holds* / *reverses* at p < 0.05, "
        "and a non-monotone relation is described by its turning point and the slope on each side.")


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation and count of the values that are not None or NaN."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(v) / n
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def pm(ms: tuple[float, float, int], digits: int = 4) -> str:
    """``mean ± std`` of ``mean_std``'s result (the mean alone for one value, "–" for none)."""
    m, s, n = ms
    if n == 0 or math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if n > 1 and not math.isnan(s) else "")


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
    condition: str = ""  # the student's degradation (canonical spec): a JPEG quality is a condition


    @property
    def is_control(self) -> bool:
        """The alpha = 0 control series (the distillation path with no soft term)."""
        return any(not has_soft_term(r) for r in self.rows)


def condition_of(row: dict[str, Any]) -> str:
    """The canonical degradation spec of a run's student view (``size=7``, ``size=28,jpeg=10``)."""
    try:
        if row.get("degradation"):
            return Degradation.parse(str(row["degradation"])).spec()
        return Degradation(size=int(row["size"]), mode=str(row.get("resize_mode") or "bilinear")).spec()
    except (CqkdError, TypeError, ValueError):
        return str(row.get("degradation") or row.get("size"))


def has_soft_term(row: dict[str, Any]) -> bool:
    """A distilled run with alpha > 0 (the alpha = 0 control has none)."""
    return (_f(row, "alpha") or 0) > 0


def distill_series(rows: list[dict[str, Any]]) -> list[Series]:
    """The finished distillation runs grouped into series by the settings that vary, largest size first."""
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
        series.append(Series(key, label, int(rs[0]["size"]), rs[0]["model"], rs, condition_of(rs[0])))
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


def supervised_for(rows: list[dict[str, Any]], size: int, model: str | None = None,
                   condition: str | None = None) -> list[dict[str, Any]]:
    """The finished supervised runs at ``size``: those of ``model`` if any, else all of them; with
    ``condition``, only those with that degradation if any (a JPEG quality is its own baseline)."""
    sup = [r for r in rows if r["role"] == "supervised" and r["state"] == "finished" and int(r["size"]) == size]
    same_model = [r for r in sup if r.get("model") == model] or sup
    same_condition = [r for r in same_model if condition_of(r) == condition] if condition is not None else []
    return same_condition or same_model


def _per_image(row: dict[str, Any]) -> stats.PerImage:
    """The per-test-image values of a finished run (from its saved test logits), with its own ECE bins."""
    return _per_image_at(str(row["path"]), _ece_bins(row))


def _ece_bins(row: dict[str, Any]) -> int:
    """The run's ECE bin count: its row's ``ece_bins``, else its metrics.json's or config's, else the default."""
    value = _f(row, "ece_bins")
    if value is None:
        run = RunDir(row["path"])
        if run.metrics_file.exists():
            value = _f(run.metrics(), "ece_bins")
        if value is None and run.config_file.exists():
            value = run.config().ece_bins
    return int(value) if value is not None and value >= 1 else stats.ECE_BINS


@functools.lru_cache(maxsize=None)
def _per_image_at(path: str, ece_bins: int) -> stats.PerImage:
    saved = RunDir(path).test_logits()
    return stats.per_image(saved["logits"].double().numpy(), saved["labels"].numpy(), ece_bins)


def by_seed(rows: list[dict[str, Any]]) -> dict[int, stats.PerImage]:
    """One arm of a paired comparison: each seed's per-image values."""
    return {int(r["seed"]): _per_image(r) for r in rows}


def _effect_row(finding: int, series: str, what: str, a: list[dict[str, Any]], b: list[dict[str, Any]],
                metric: str, sign: int) -> dict[str, Any] | None:
    seeds = {int(r["seed"]) for r in a} & {int(r["seed"]) for r in b}
    if not seeds:
        return None
    e = stats.paired_effect(by_seed([r for r in a if int(r["seed"]) in seeds]),
                            by_seed([r for r in b if int(r["seed"]) in seeds]), metric, sign)
    return dict(finding=finding, series=series, what=what, kind="effect", estimate=e.mean, ci=(e.ci_low, e.ci_high),
                p=e.p, n=e.n_seeds, mde=e.mde, verdict=e.verdict, text=stats.format_effect(e))


def _relation_rows(series: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finding 2 clause by clause over a T series (uncalibrated teacher, fixed T): trends over three or
    more temperatures, paired effects (higher T − lower T) over two; correlations in both cases."""
    pts = [(float(r["temperature_used"]), int(r["seed"]), _f(r, "entropy"), _f(r, "ece"), _f(r, "top1"))
           for r in rows]
    levels = sorted({p[0] for p in pts})
    if len(levels) < 2:
        return []
    t, seed, ent, ece, top1 = (np.array(c, dtype=float) for c in zip(*pts))
    out = []
    if len(levels) == 2:  # two temperatures (the quality study): each T clause as a paired effect, high - low T
        hi = [r for r in rows if float(r["temperature_used"]) == levels[1]]
        lo = [r for r in rows if float(r["temperature_used"]) == levels[0]]
        for metric, name, sign in (("entropy", "entropy", +1), ("ece", "ECE", -1), ("top1", "top-1", +1)):
            row = _effect_row(2, series, f"{name} at T={levels[1]:g} − T={levels[0]:g} (tcal=none)", hi, lo, metric, sign)
            out += [row] if row else []
    for what, y, sign in (("ρ(T, entropy)", ent, +1), ("ρ(T, ECE)", ece, -1), ("ρ(T, top-1)", top1, +1)):
        if len(levels) < 3:
            break
        tr = stats.trend(t, y, sign, groups=seed)
        out.append(dict(finding=2, series=series, what=what, kind="trend", estimate=tr.rho, ci=None, p=tr.p,
                        n=tr.n, mde=None, verdict=tr.verdict, shape=tr.shape, text=stats.format_trend(tr)))
    for what, x, y, sign in (("r(entropy, ECE)", ent, ece, -1), ("r(entropy, top-1)", ent, top1, +1)):
        if len(pts) < 3:
            break  # a correlation needs three runs
        c = stats.correlation(x, y, sign)
        out.append(dict(finding=2, series=series, what=what, kind="correlation", estimate=c.r, ci=None, p=c.p,
                        n=c.n, mde=None, verdict=c.verdict, text=stats.format_correlation(c)))
    return out


def best_by_val(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], list[dict[str, Any]]]:
    """The (T, teacher calibration) setting with the best mean validation top-1, and its runs."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[setting_of(r)].append(r)
    key = max(by, key=lambda k: mean_std([_f(r, "best_val_top1") for r in by[k]])[0])
    return key, by[key]


def series_findings(label: str, rows: list[dict[str, Any]], supervised: list[dict[str, Any]],
                    temperatures: set[float] | None = None, each_t: bool = False) -> list[dict[str, Any]]:
    """Findings 1-3 of one series (one teacher, size and data; alpha > 0), optionally on some T only;
    ``each_t`` adds finding 1 at every fixed T (uncalibrated teacher) next to the best-by-val setting."""
    kd = [r for r in rows if r.get("temperature") != "calibrated" and has_soft_term(r)]
    if temperatures is not None:
        kd = [r for r in kd if float(r["temperature"]) in temperatures]
    out: list[dict[str, Any]] = []
    if kd and supervised:
        (t, tcal), best = best_by_val(kd)
        row = _effect_row(1, label, f"top-1 CQKD (T={t}, tcal={tcal}; best by val) − supervised", best,
                          supervised, "top1", +1)
        out += [row] if row else []
    unc = [r for r in kd if r.get("teacher_calibration") == "none"]
    for t in sorted({setting_of(r)[0] for r in unc}, key=float) if each_t and supervised else []:
        row = _effect_row(1, label, f"top-1 CQKD at T={t} (tcal=none) − supervised",
                          [r for r in unc if setting_of(r)[0] == t], supervised, "top1", +1)
        out += [row] if row else []
    out += _relation_rows(label, unc)
    cal = {(setting_of(r)[0], int(r["seed"])): r for r in kd if r.get("teacher_calibration") == "temperature"}
    for t in sorted({k[0] for k in cal}, key=float):
        a = [r for (tt, _), r in cal.items() if tt == t]
        b = [r for r in unc if setting_of(r)[0] == t]
        for metric, name, sign in (("top1", "top-1", +1), ("ece", "ECE", -1)):
            row = _effect_row(3, label, f"{name} calibrated − uncalibrated teacher at T={t}", a, b, metric, sign)
            out += [row] if row else []
    return out


def findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three findings for every series of a sweep (see ``RULE``), finding by finding."""
    result = []
    for s in distill_series(rows):
        if s.is_control:
            continue  # the alpha = 0 control: see control_rows
        result += series_findings(s.label, s.rows, supervised_for(rows, s.size, s.model, s.condition), each_t=True)
    result.sort(key=lambda f: f["finding"])
    return result


def control_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alpha = 0 control against the supervised student of the same seed, per size."""
    out = []
    for s in distill_series(rows):
        ctrl = [r for r in s.rows if not has_soft_term(r)]
        sup = {int(r["seed"]): r for r in supervised_for(rows, s.size, s.model, s.condition)}
        pairs = [(r, sup[int(r["seed"])]) for r in ctrl if int(r["seed"]) in sup]
        if not pairs:
            continue
        same = sum(torch.equal(RunDir(a["path"]).test_logits()["logits"], RunDir(b["path"]).test_logits()["logits"])
                   for a, b in pairs)
        diff = max(abs((_f(a, "top1") or 0) - (_f(b, "top1") or 0)) for a, b in pairs)
        out.append(dict(size=s.size, seeds=len(pairs), identical=same, max_top1_diff=diff))
    return out


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
