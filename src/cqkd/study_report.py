"""The report of a sweep: ``results.csv``, ``report.md`` and figures, and the paper's findings.

Čuk et al. (arXiv 2304.07593) report three findings; this module measures each on a sweep:

1. A CQKD student beats a student trained supervised at the same low resolution.
   Effect: test top-1 of the CQKD setting with the best *validation* top-1 (mean over seeds)
   minus the supervised baseline's, paired by seed; mean and std over seeds.
2. A higher distillation temperature T raises the student's entropy, which lowers its ECE and
   raises its top-1. Effect: within each (input size, seed), Spearman ρ(T, entropy),
   Pearson r(entropy, ECE) and r(entropy, top-1) over the fixed temperatures; mean and std
   over seeds.
3. Calibrating the teacher (temperature scaling) benefits the student. Effect: top-1 and ECE
   of calibrated minus uncalibrated teacher at the same T, averaged over the matched T per
   seed; mean and std over seeds.

Verdict rule (stated in the report): *holds* when the mean has the paper's sign and
|mean| > 2 × std over seeds; *does not hold* when it has the opposite sign and
|mean| > 2 × std; *inconclusive* otherwise, or with fewer than 2 seeds (a correlation must
also exceed 0.3 in size; one whose mean + 2 std stays below 0.3 is "no relation"). Nothing is selected
on the test split: settings are chosen by ``best_val_top1``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cqkd.config import RunConfig
from cqkd.errors import CqkdError
from cqkd.runs import RunDir, atomic_write, read_json, write_text

CONFIG_KEYS = tuple(f.name for f in fields(RunConfig))
# config keys that never tell two settings apart (hardware, paths, loaders)
_NOT_SETTING = {"data_dir", "accelerator", "devices", "strategy", "num_nodes", "precision", "num_workers",
                "teacher_cache", "seed"}
CORRELATION_FLOOR = 0.3
RULE = ("*holds*: the effect has the paper's sign and |mean| > 2 × its std over seeds; "
        "*does not hold*: the opposite sign and |mean| > 2 × std; *inconclusive*: otherwise, "
        "or fewer than 2 seeds. A correlation must also have |mean| > 0.3 to count either way; "
        "one with |mean| + 2 × std < 0.3 is reported as *does not hold (no relation)*.")


# ------------------------------------------------------------------------------ rows

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys; lists and other non-scalars are left out."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif v is None or isinstance(v, (str, int, float, bool)):
            flat[key] = v
    return flat


def _scan(directory: Path) -> list[tuple[str, str, Path]]:
    """Runs in a folder without sweep.json: every config.yaml up to three levels down."""
    found = []
    for depth in ("*/config.yaml", "*/*/config.yaml", "*/*/*/config.yaml"):
        for f in sorted(directory.glob(depth)):
            found.append(f.parent)
    kinds = {}
    teachers = set()
    for p in found:
        try:
            cfg = RunDir(p).config()
        except CqkdError:
            continue
        kinds[p] = cfg.kind
        if cfg.teacher:
            teachers.add(os.path.abspath(cfg.teacher))
    out = []
    for p, kind in kinds.items():
        role = "distill" if kind == "distill" else ("teachers" if os.path.abspath(p) in teachers else "supervised")
        out.append((str(p.relative_to(directory)), role, p))
    return out


def collect_rows(directory: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per run of the sweep in ``directory`` (failed runs too) and the sweep state."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CqkdError(f"{str(directory)!r} is not a directory")
    state: dict[str, Any] = {}
    sweep_file = directory / "sweep.json"
    if sweep_file.exists():
        state = read_json(sweep_file)
        entries = []
        for item in state.get("plan", []):
            path = Path(item["path"]) if item.get("path") else directory / item["name"]
            entries.append((item["name"], item["group"], path))
    else:
        entries = _scan(directory)
    if not entries:
        raise CqkdError(f"{str(directory)!r} holds no sweep.json and no run directories")
    rows = []
    for name, group, path in entries:
        info = state.get("runs", {}).get(name, {})
        rd = RunDir(path)
        row: dict[str, Any] = {"run": name, "role": group}
        cfg_dict = None
        try:
            cfg_dict = rd.config().to_dict() if rd.config_file.exists() else None
        except CqkdError:
            cfg_dict = None
        cfg_dict = info.get("config") or cfg_dict  # the planned config wins (the dir may be stale)
        finished = rd.is_finished
        state_name = "finished" if finished else (info.get("state") or rd.state or "missing")
        if info.get("state") == "failed":
            state_name = "failed"
        row["state"] = state_name
        row["error"] = info.get("error") if state_name == "failed" else None
        for k in CONFIG_KEYS:
            row[k] = (cfg_dict or {}).get(k)
        if finished and state_name == "finished":
            metrics = flatten(rd.metrics())
            for k, v in metrics.items():
                if k == "temperature":
                    row["temperature_used"] = v
                elif k not in row:
                    row[k] = v
        rows.append(row)
    return rows, state


def write_csv(rows: list[dict[str, Any]], path: Path) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})

    atomic_write(path, write)
    return columns


# ------------------------------------------------------------------------------ statistics

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


# ------------------------------------------------------------------------------ grouping

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


# ------------------------------------------------------------------------------ findings

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


# ------------------------------------------------------------------------------ the report

def _pm(ms: tuple[float, float, int], digits: int = 4) -> str:
    m, s, n = ms
    if n == 0 or math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if n > 1 and not math.isnan(s) else "")


def _pm_signed(ms: tuple[float, float, int], digits: int = 4) -> str:
    m, sd, n = ms
    if n == 0 or math.isnan(m):
        return "–"
    return f"{m:+.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 and not math.isnan(sd) else "")


def _num(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    from cqkd.report import markdown_table

    return markdown_table(headers, rows)


def _duration(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.2f} h"


def size_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher, supervised and best-by-val CQKD student per input size."""
    out = []
    for r in rows:
        if r["role"] == "teachers" and r["state"] == "finished":
            out.append(dict(size=int(r["size"]), method=f"teacher {r['run'].rsplit('/', 1)[-1]}", model=r["model"],
                            setting="", n=1, val=mean_std([_f(r, "best_val_top1")]), top1=mean_std([_f(r, "top1")]),
                            ece=mean_std([_f(r, "ece")]), entropy=mean_std([_f(r, "entropy")]), flops=_f(r, "flops")))
    sizes = sorted({int(r["size"]) for r in rows if r["role"] == "supervised" and r["state"] == "finished"}
                   | {s.size for s in distill_series(rows)}, reverse=True)
    series = distill_series(rows)
    for size in sizes:
        sup = supervised_for(rows, size)
        models = sorted({r["model"] for r in sup})
        for model in models:
            rs = [r for r in sup if r["model"] == model]
            out.append(dict(size=size, method="supervised", model=model, setting="", n=len(rs),
                            val=mean_std([_f(r, "best_val_top1") for r in rs]), top1=mean_std([_f(r, "top1") for r in rs]),
                            ece=mean_std([_f(r, "ece") for r in rs]), entropy=mean_std([_f(r, "entropy") for r in rs]),
                            flops=_f(rs[0], "flops")))
        for s in series:
            if s.size != size:
                continue
            table = settings_table(s)
            best = max(table, key=lambda e: (e["best_val_top1"][0] if not math.isnan(e["best_val_top1"][0]) else -1))
            label = "CQKD (best by val)" + (f" [{s.label}]" if s.label != f"size={size}" else "")
            out.append(dict(size=size, method=label, model=s.model, setting=f"T={best['T']}, tcal={best['tcal']}",
                            n=best["n"], val=best["best_val_top1"], top1=best["top1"], ece=best["ece"],
                            entropy=best["entropy"], flops=best["flops"][0]))
    return out


def write_report(directory: str | os.PathLike) -> dict[str, Any]:
    """Write results.csv, report.md and figures/*.png for the sweep in ``directory``."""
    directory = Path(directory)
    rows, state = collect_rows(directory)
    csv_path = directory / "results.csv"
    write_csv(rows, csv_path)
    fig_dir = directory / "figures"
    from cqkd import plots_study

    series = distill_series(rows)
    sizes = size_table(rows)
    figures: dict[str, Path] = {}
    for name, func in (("temperature", plots_study.temperature_figure), ("size", plots_study.size_figure),
                       ("entropy", plots_study.entropy_figure), ("calibration", plots_study.calibration_figure)):
        path = fig_dir / f"{name}.png"
        if func(rows, series, sizes, path):
            figures[name] = path

    n_fin = sum(r["state"] == "finished" for r in rows)
    failed = [r for r in rows if r["state"] == "failed"]
    lines = [f"# cqkd sweep report: `{directory}`", ""]
    if state.get("source"):
        lines.append(f"Sweep file: `{state['source']}`" + (f" — {state['description']}" if state.get("description") else ""))
        lines.append("")
    invocations = state.get("invocations", [])
    compute = sum(_f(r, "time_s") or 0 for r in rows if r["state"] == "finished")
    lines += [f"Runs: {len(rows)} in the plan, {n_fin} finished, {len(failed)} failed, "
              f"{len(rows) - n_fin - len(failed)} not run.", ""]
    wall = state.get("total_wall_s")
    budget = state.get("budget_minutes")
    timing = f"Wall time of the sweep: {_duration(wall)} over {len(invocations)} invocation(s)"
    if budget:
        timing += f"; budget: {budget:g} min" + (f" ({100 * wall / (budget * 60):.0f}% used)" if wall else "")
    else:
        timing += "; budget: not set (`budget_minutes` in the sweep file)"
    lines += [timing + f". Training and testing time summed over the finished runs: {_duration(compute)}.", ""]
    lines += ["All metrics are on the test split; ECE with the runs' equal-width bins (15 by default) on top-1 "
              "confidence; entropy of the predictive distribution in nats; FLOPs per image (forward). "
              "Mean ± sample std over seeds. Settings are chosen by validation top-1 (`best_val_top1`), "
              "never by test.", ""]

    lines += ["## Findings of the paper, measured here", "", "Verdict rule: " + RULE + " With 2 or 3 seeds "
              "the std is itself uncertain: read the verdicts as indicative at this scale.", ""]
    found = findings(rows)
    if found:
        lines.append(_md(["#", "series", "effect", "mean", "std over seeds", "seeds", "verdict"],
                         [[f["finding"], f["series"], f["what"], _num(f["mean"]), _num(f["std"]).lstrip("+"),
                           f["n"], f["verdict"]] for f in found]))
    else:
        lines.append("No finished distillation runs: nothing to measure.\n")
    lines += ["Finding 1: a CQKD student beats the supervised student at the same input size. "
              "Finding 2: a higher T raises the student's entropy (ρ > 0), which lowers its ECE (r < 0) and "
              "raises its top-1 (r > 0); correlations within each seed over the fixed temperatures "
              "(uncalibrated teacher). Finding 3: a calibrated teacher gives a better student "
              "(top-1 up, ECE down) at matched T.", ""]

    lines += ["## Teacher, supervised and best CQKD student per input size", ""]
    lines.append(_md(["size", "method", "model", "setting", "n", "val top-1", "test top-1", "ECE", "entropy",
                      "FLOPs/image"],
                     [[e["size"], e["method"], e["model"], e["setting"], e["n"], _pm(e["val"]), _pm(e["top1"]),
                       _pm(e["ece"]), _pm(e["entropy"]), f"{e['flops'] / 1e6:.2f}M" if e["flops"] else "–"]
                      for e in sizes]))
    if "size" in figures:
        lines += ["![top-1 against input size](figures/size.png)", ""]

    lines += ["## Distillation settings", ""]
    for s in series:
        lines += [f"### {s.label}", ""]
        sup = supervised_for(rows, s.size, s.model)
        if sup:
            lines.append(f"Supervised baseline: top-1 {_pm(mean_std([_f(r, 'top1') for r in sup]))}, "
                         f"ECE {_pm(mean_std([_f(r, 'ece') for r in sup]))}, "
                         f"entropy {_pm(mean_std([_f(r, 'entropy') for r in sup]))} (n={len(sup)}).\n")
        lines.append(_md(["T", "teacher calibration", "T used", "n", "val top-1", "test top-1", "ECE", "entropy"],
                         [[e["T"], e["tcal"], _pm(e["temperature_used"], 3), e["n"], _pm(e["best_val_top1"]),
                           _pm(e["top1"]), _pm(e["ece"]), _pm(e["entropy"])] for e in settings_table(s)]))
        pairs = calibration_pairs(s)
        if pairs:
            lines += ["With and without teacher calibration at the same T (differences paired by seed):", ""]
            lines.append(_md(["T", "seeds", "top-1 uncalibrated", "top-1 calibrated", "Δ top-1", "ECE uncalibrated",
                              "ECE calibrated", "Δ ECE"],
                             [[p["T"], p["n"], _pm(p["top1_unc"]), _pm(p["top1_cal"]), _pm_signed(p["top1_diff"]),
                               _pm(p["ece_unc"]), _pm(p["ece_cal"]), _pm_signed(p["ece_diff"])] for p in pairs]))
    for name, title in (("temperature", "Top-1, ECE and entropy against T (uncalibrated teacher; bands: "
                         "supervised baseline mean ± std; stars: T = the teacher's T_cal)"),
                        ("entropy", "Student entropy against ECE and top-1 (all distilled runs)"),
                        ("calibration", "With and without teacher calibration at each T")):
        if name in figures:
            lines += [f"## {title.split(' (')[0]}", "", title + ".", "", f"![{name}](figures/{name}.png)", ""]
    if failed:
        lines += ["## Failed runs", ""]
        lines.append(_md(["run", "error"], [[r["run"], (r.get("error") or "").replace("|", "/")] for r in failed]))
    lines += ["## Files", "", "- `results.csv`: one row per run: every config field, the scalar metrics "
              "(`teacher_metrics.*` etc. flattened), `temperature_used` (the T applied), state and error.",
              "- `sweep.json`: the plan, each run's state and error, timing of every invocation.",
              f"- Generated by `cqkd report {directory}` at {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    report = directory / "report.md"
    write_text(report, "\n".join(lines))
    return {"report": report, "csv": csv_path, "figures": list(figures.values()), "findings": found}
