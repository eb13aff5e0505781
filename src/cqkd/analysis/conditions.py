"""The conditions report: the paper's three findings under named conditions (teacher calibration,
label budget, input resolution), each with its effect, CI and verdict (see docs/results/conditions.md)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from cqkd.analysis.figures import effects_figure
from cqkd.analysis.findings import RULE, _f, has_soft_term, series_findings
from cqkd.analysis.report import collect_rows, findings_table
from cqkd.core.io import write_text
from cqkd.core.text import markdown_table

TEMPERATURES = {1.0, 4.0, 16.0}  # the T every condition shares
CLAUSES = (
    (1, "top-1 CQKD (T=", "F1: CQKD (best T by val) beats supervised (top-1)"),
    (2, "ρ(T, entropy)", "F2a: higher T, higher entropy"),
    (2, "ρ(T, ECE)", "F2b: higher T, lower ECE"),
    (2, "ρ(T, top-1)", "F2c: higher T, higher top-1"),
    (2, "r(entropy, ECE)", "F2d: higher entropy, lower ECE"),
    (2, "r(entropy, top-1)", "F2e: higher entropy, higher top-1"),
    (3, "top-1 calibrated", "F3a: calibrated teacher, higher top-1"),
    (3, "ECE calibrated", "F3b: calibrated teacher, lower ECE"),
)


def _finished(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] == "finished"]


def _teacher_name(row: dict[str, Any]) -> str:
    return Path(str(row.get("teacher") or "")).name


def _teacher_facts(rows: list[dict[str, Any]], name: str) -> str:
    """T_cal, top-1 and ECE of a teacher, as its students recorded them."""
    for r in rows:
        if r["role"] == "distill" and _teacher_name(r) == name and _f(r, "t_cal") is not None:
            return (f"teacher `{name}`: test top-1 {_f(r, 'teacher_metrics.top1'):.4f}, ECE "
                    f"{_f(r, 'teacher_metrics.ece'):.4f}, T_cal {_f(r, 't_cal'):.3f} (fitted on val)")
    return f"teacher `{name}`"


def conditions(main: list[dict[str, Any]], cond: list[dict[str, Any]]) -> dict[str, list[tuple[str, list[dict]]]]:
    """{condition group: [(condition label, findings rows)]} from the main study's and the conditions sweep's rows."""
    main, cond = _finished(main), _finished(cond)
    kd = lambda rows, **k: [r for r in rows if r["role"] == "distill" and has_soft_term(r)  # noqa: E731
                            and all(str(r.get(a)) == str(v) for a, v in k.items())]
    sup = lambda rows, **k: [r for r in rows if r["role"] == "supervised"  # noqa: E731
                             and all(str(r.get(a)) == str(v) for a, v in k.items())]
    main_teacher = next((_teacher_name(r) for r in main if r["role"] == "distill"), "large")
    groups: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for name, label in ((main_teacher, "the main study's teacher"), ("over", "overconfident teacher"),
                        ("under", "underconfident teacher")):
        rows = main if name == main_teacher else cond
        students = [r for r in kd(rows, size=7) if _teacher_name(r) == name]
        if students:
            title = f"{label} ({_teacher_facts(rows, name)})"
            groups["teacher calibration (7 px, 20,000 images)"].append(
                (title, series_findings(label, students, sup(main, size=7), TEMPERATURES)))
    for n, label, rows, tname in ((2000, "2,000 images", cond, "n2k"), (10000, "10,000 images", cond, "n10k"),
                                  (20000, "20,000 images (main study)", main, main_teacher),
                                  (None, "55,000 images (all)", cond, "n55k")):
        students = [r for r in kd(rows, size=7, train_samples=n) if _teacher_name(r) == tname]
        base = sup(rows, size=7, train_samples=n)
        if students:
            groups["label budget (7 px)"].append((label, series_findings(label, students, base, TEMPERATURES)))
    for size in (14, 7, 4):
        students = kd(main, size=size)
        if students:
            groups["resolution (main study, 20,000 images)"].append(
                (f"{size} px", series_findings(f"{size} px", students, sup(main, size=size), TEMPERATURES)))
    return groups


def _clause(rows: list[dict[str, Any]], finding: int, prefix: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["finding"] == finding and r["what"].startswith(prefix)]


def summary(groups: dict[str, list[tuple[str, list[dict]]]]) -> list[str]:
    """One line per clause: the conditions where it holds, reverses, or stays inconclusive."""
    lines = []
    for finding, prefix, text in CLAUSES:
        by: dict[str, list[str]] = defaultdict(list)
        for group, conds in groups.items():
            for label, rows in conds:
                for r in _clause(rows, finding, prefix):
                    where = f"{group.split(' (')[0]}: {label.split(' (')[0]}" + (
                        f" {r['what'].rsplit(' at ', 1)[1]}" if " at T=" in r["what"] else "")
                    by[r["verdict"]].append(where)
        if by:
            parts = [f"**{v}** under {', '.join(by[v])}" for v in ("holds", "reverses", "inconclusive") if by.get(v)]
            lines.append(f"- {text}: " + "; ".join(parts) + ".")
    return lines


def write_conditions_report(cond_dirs: list[str | os.PathLike], main_dir: str | os.PathLike,
                            out: str | os.PathLike | None = None) -> Path:
    """Write the conditions report (Markdown) for conditions sweep directories and the main study they extend."""
    cond_rows: list[dict[str, Any]] = []
    states = []
    for d in cond_dirs:
        rows, state = collect_rows(d)
        cond_rows += rows
        states.append((f"conditions sweep `{d}`", state))
    main_rows, main_state = collect_rows(main_dir)
    groups = conditions(main_rows, cond_rows)
    out = Path(out) if out else Path(cond_dirs[0]) / "conditions.md"
    names = ", ".join(f"`{d}`" for d in cond_dirs)
    lines = [f"# Conditions report: {names} with the main study `{main_dir}`", "",
             "Each finding's clauses under each condition; everything not named is held equal (same test set, "
             f"the same T ∈ {{{', '.join(f'{t:g}' for t in sorted(TEMPERATURES))}}} in every condition, 5 seeds, "
             "supervised baselines trained on the same images at the same size).", "",
             "## Summary", "", *summary(groups), "", "Verdict rule: " + RULE, ""]
    for name, state in (*states, ("main study", main_state)):
        if state.get("total_wall_s"):
            lines.append(f"Wall time of the {name}: {state['total_wall_s'] / 60:.1f} min over "
                         f"{len(state.get('invocations', []))} invocation(s).")
    lines.append("")
    if effects_figure(groups, out.parent / "figures" / "conditions-effects.png"):
        lines += ["![paired effects per condition](figures/conditions-effects.png)", ""]
    for group, conds in groups.items():
        lines += [f"## {group}", ""]
        for label, rows in conds:
            lines += [f"### {label}", "", findings_table(rows) if rows else "No finished runs.", ""]
    if not groups:
        lines.append(markdown_table(["note"], [["no finished runs in either directory"]]))
    write_text(out, "\n".join(lines) + "\n")
    return out
