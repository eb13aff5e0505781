"""The report of a sweep: ``results.csv``, ``report.md`` and figures, and the paper's findings
(measured as in ``cqkd.analysis.findings``; the rule is stated in every report)."""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

from cqkd.analysis import figures as plots_study
from cqkd.analysis.findings import (
    RULE,
    _f,
    calibration_pairs,
    condition_of,
    control_rows,
    distill_series,
    findings,
    mean_std,
    settings_table,
    supervised_for,
)
from cqkd.analysis.findings import pm as _pm
from cqkd.analysis.methods import is_methods_sweep, methods_section
from cqkd.core import faults
from cqkd.core.config import CONFIG_KEYS
from cqkd.core.io import atomic_write, write_text
from cqkd.core.rundir import RunDir, claim_outputs
from cqkd.core.text import markdown_table
from cqkd.errors import CqkdError
from cqkd.sweep.state import load_state

FIGURES = ("temperature", "size", "entropy", "calibration")
REPORT_FILES = ("results.csv", "report.md", *(f"figures/{name}.png" for name in FIGURES))  # what a report writes


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
        state = load_state(directory)
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
        row: dict[str, Any] = {"run": name, "role": group, "path": str(path)}
        cfg_dict = None
        try:
            cfg_dict = rd.config().to_dict() if rd.config_file.exists() else None
        except CqkdError:
            cfg_dict = None
        cfg_dict = info.get("config") or cfg_dict  # the planned config wins (the dir may be stale)
        finished = rd.is_finished
        state_name = "finished" if finished else (info.get("state") or rd.state or "missing")
        if info.get("state") in ("failed", "interrupted"):
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
    """Write ``rows`` as a CSV file (columns in first-seen order) atomically; returns the columns."""
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


def _pm_signed(ms: tuple[float, float, int], digits: int = 4) -> str:
    m, sd, n = ms
    if n == 0 or math.isnan(m):
        return "–"
    return f"{m:+.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 and not math.isnan(sd) else "")


def _num(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _md(headers: list[str], rows: list[list[Any]]) -> str:

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
        several = len({condition_of(r) for r in sup}) > 1  # e.g. JPEG qualities at one size: one row each
        for model, cond in sorted({(r["model"], condition_of(r)) for r in sup}):
            rs = [r for r in sup if r["model"] == model and condition_of(r) == cond]
            out.append(dict(size=size, method="supervised" + (f" [{cond}]" if several else ""), model=model,
                            setting="", n=len(rs),
                            val=mean_std([_f(r, "best_val_top1") for r in rs]), top1=mean_std([_f(r, "top1") for r in rs]),
                            ece=mean_std([_f(r, "ece") for r in rs]), entropy=mean_std([_f(r, "entropy") for r in rs]),
                            flops=_f(rs[0], "flops")))
        for s in series:
            if s.size != size or s.is_control:
                continue  # other sizes, and the alpha = 0 control (reported on its own)
            table = settings_table(s)
            best = max(table, key=lambda e: (e["best_val_top1"][0] if not math.isnan(e["best_val_top1"][0]) else -1))
            label = "CQKD (best by val)" + (f" [{s.label}]" if s.label != f"size={size}" else "")
            out.append(dict(size=size, method=label, model=s.model, setting=f"T={best['T']}, tcal={best['tcal']}",
                            n=best["n"], val=best["best_val_top1"], top1=best["top1"], ece=best["ece"],
                            entropy=best["entropy"], flops=best["flops"][0]))
    return out


def findings_table(found: list[dict[str, Any]]) -> str:
    """The findings as a Markdown table: effect or relation, estimate with CI or shape, verdict."""
    body = []
    for f in found:
        detectable = f"{f['mde']:.4f}" if f.get("mde") is not None and f["verdict"] == "inconclusive" else ""
        body.append([f["finding"], f["series"], f["what"], f["text"].replace("|", "/"), detectable, f["verdict"]])
    return _md(["#", "series", "effect", "estimate [95% CI], p, seeds / relation", "detectable", "verdict"], body)


def write_report(directory: str | os.PathLike) -> dict[str, Any]:
    """Write results.csv, report.md and figures/*.png for the sweep in ``directory``."""
    directory = Path(directory)
    rows, state = collect_rows(directory)
    claim_outputs(directory, REPORT_FILES, standard=(directory / "sweep.json").is_file())
    csv_path = directory / "results.csv"
    write_csv(rows, csv_path)
    faults.point("report")
    fig_dir = directory / "figures"

    series = distill_series(rows)
    sizes = size_table(rows)
    figures: dict[str, Path] = {}
    for name, func in (("temperature", plots_study.temperature_figure), ("size", plots_study.size_figure),  # FIGURES
                       ("entropy", plots_study.entropy_figure), ("calibration", plots_study.calibration_figure)):
        path = fig_dir / f"{name}.png"
        if func(rows, [s for s in series if not s.is_control], sizes, path):
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

    lines += ["## Findings of the paper, measured here", "", "Verdict rule: " + RULE, ""]
    found = findings(rows)
    if found:
        lines.append(findings_table(found))
    else:
        lines.append("No finished distillation runs: nothing to measure.\n")
    lines += ["Finding 1: a CQKD student beats the supervised student at the same input size. "
              "Finding 2: a higher T raises the student's entropy, which lowers its ECE and raises its top-1 "
              "(each clause tested on its own, over the fixed temperatures with the uncalibrated teacher). "
              "Finding 3: a calibrated teacher gives a better student (top-1 up, ECE down) at the same T.", ""]
    control = control_rows(rows)
    if control:
        lines += ["**Control (α = 0 through the distillation path).** A student distilled with α = 0 draws the same "
                  "views from the same bank and starts from the same weights as the supervised student of its seed, "
                  "so the two must be equal: only the loss differs between supervised and CQKD students.", ""]
        lines.append(_md(["size", "seeds", "identical test logits", "max abs. Δ top-1"],
                         [[c["size"], c["seeds"], f"{c['identical']}/{c['seeds']}", f"{c['max_top1_diff']:.4f}"]
                          for c in control]))

    if is_methods_sweep(rows):
        lines += methods_section(rows, _md)

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
        sup = supervised_for(rows, s.size, s.model, s.condition)
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
