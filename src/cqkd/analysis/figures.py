"""Figures of a sweep report (matplotlib, Agg backend, imported only when a report is drawn).

Each function takes the report's rows, distillation series and size table, draws one PNG
atomically and returns False when there is nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from cqkd.analysis.findings import Series, _f, mean_std, settings_table, supervised_for
from cqkd.core.io import atomic_write

_METRICS = (("top1", "test top-1"), ("ece", "ECE"), ("entropy", "mean entropy (nats)"))


def _plt():
    import matplotlib  # pyplot gets the Agg backend when a figure is drawn, not at import (the user's backend is left alone)

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), mode="wb")
    finally:
        _plt().close(fig)


def _fixed_points(table: list[dict[str, Any]], tcal: str, key: str) -> tuple[list[float], list[float], list[float]]:
    """(T, mean, std) of ``key`` over a series' settings table, fixed temperatures only, by T."""
    xs, ms, ss = [], [], []
    for e in table:
        if e["T"] == "calibrated" or e["tcal"] != tcal:
            continue
        m, sd, _ = e[key]
        xs.append(float(e["T"]))
        ms.append(m)
        ss.append(0.0 if math.isnan(sd) else sd)
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    return [xs[i] for i in order], [ms[i] for i in order], [ss[i] for i in order]


def _temperature_axis(ax: Any, label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distillation temperature T")
    ax.set_ylabel(label)


def temperature_figure(rows: list[dict[str, Any]], series: list[Series], sizes: Any, path: Path) -> bool:
    """Top-1, ECE and entropy against T (log2), one line per series, supervised bands."""
    tables = [settings_table(s) for s in series]
    if not any(_fixed_points(t, "none", "top1")[0] for t in tables):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, table) in enumerate(zip(series, tables)):
        c = colors[i % len(colors)]
        sup = supervised_for(rows, s.size, s.model, s.condition)
        for ax, (key, label) in zip(axes, _METRICS):
            xs, ms, ss = _fixed_points(table, "none", key)
            if not xs:
                continue
            ax.errorbar(xs, ms, yerr=ss, color=c, marker="o", capsize=3, label=s.label)
            for e in table:  # T = T_cal, placed at the mean T_cal used
                if e["T"] == "calibrated" and e["tcal"] == "none" and not math.isnan(e["temperature_used"][0]):
                    m, sd, _ = e[key]
                    ax.errorbar([e["temperature_used"][0]], [m], yerr=[0 if math.isnan(sd) else sd], color=c,
                                marker="*", markersize=12, capsize=3, linestyle="none")
            if sup:
                m, sd, _ = mean_std([_f(r, key) for r in sup])
                ax.axhline(m, color=c, linestyle="--", linewidth=1, label=f"supervised {s.size} px")
                if not math.isnan(sd):
                    ax.axhspan(m - sd, m + sd, color=c, alpha=0.12)
            _temperature_axis(ax, label)
    axes[0].legend(fontsize=8)
    fig.suptitle("CQKD students against T (mean ± std over seeds)")
    _save(fig, path)
    return True


def size_figure(rows: list[dict[str, Any]], series: list[Series], sizes: list[dict[str, Any]], path: Path) -> bool:
    """Top-1 against input size: teacher, supervised, best-by-val CQKD student."""
    if not sizes:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in sizes:
        kind = "teacher" if e["method"].startswith("teacher") else e["method"].split(" [")[0]
        groups.setdefault(kind, []).append(e)
    markers = {"teacher": "s", "supervised": "o", "CQKD (best by val)": "^"}
    for kind, es in groups.items():
        es = sorted(es, key=lambda e: e["size"])
        ax.errorbar([e["size"] for e in es], [e["top1"][0] for e in es],
                    yerr=[0 if math.isnan(e["top1"][1]) else e["top1"][1] for e in es],
                    marker=markers.get(kind, "o"), capsize=3, label=kind, linestyle="-" if len(es) > 1 else "none")
    ax.set_xlabel("input size (px)")
    ax.set_ylabel("test top-1")
    ax.set_xscale("log", base=2)
    ticks = sorted({e["size"] for e in sizes})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.set_title("top-1 against input size (CQKD setting chosen on val)")
    _save(fig, path)
    return True


def entropy_figure(rows: list[dict[str, Any]], series: list[Series], sizes: Any, path: Path) -> bool:
    """Student entropy against ECE and against top-1 over all distilled runs, with Pearson r."""
    pts = [r for s in series for r in s.rows if _f(r, "entropy") is not None]
    if len(pts) < 2:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in ((axes[0], "ece", "ECE"), (axes[1], "top1", "test top-1")):
        xs_all, ys_all = [], []
        for i, s in enumerate(series):
            xs = [_f(r, "entropy") for r in s.rows]
            ys = [_f(r, key) for r in s.rows]
            ok = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            ax.scatter([x for x, _ in ok], [y for _, y in ok], color=colors[i % len(colors)], label=s.label, s=22)
            xs_all += [x for x, _ in ok]
            ys_all += [y for _, y in ok]
        r = float(scipy_stats.pearsonr(xs_all, ys_all).statistic) if len(xs_all) > 2 else math.nan
        ax.set_title(f"entropy vs {label}: Pearson r = {r:.2f} (n={len(xs_all)})" if not math.isnan(r)
                     else f"entropy vs {label} (n={len(xs_all)}; r undefined)")
        ax.set_xlabel("student mean entropy (nats)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    _save(fig, path)
    return True


def calibration_figure(rows: list[dict[str, Any]], series: list[Series], sizes: Any, path: Path) -> bool:
    """Top-1 and ECE against T, with (dashed) and without (solid) teacher calibration."""
    tables = [settings_table(s) for s in series]
    if not any(_fixed_points(t, "temperature", "top1")[0] for t in tables):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, table) in enumerate(zip(series, tables)):
        c = colors[i % len(colors)]
        for ax, (key, label) in zip(axes, _METRICS[:2]):
            for tcal, style in (("none", "-"), ("temperature", "--")):
                xs, ms, ss = _fixed_points(table, tcal, key)
                if xs:
                    ax.errorbar(xs, ms, yerr=ss, color=c, linestyle=style, marker="o" if tcal == "none" else "D",
                                capsize=3, label=f"{s.label}, teacher calibration={tcal}")
            _temperature_axis(ax, label)
    axes[0].legend(fontsize=7)
    fig.suptitle("teacher calibration (temperature scaling) on and off, mean ± std over seeds")
    _save(fig, path)
    return True


def effects_figure(groups: dict[str, list[tuple[str, list[dict[str, Any]]]]], path: Path) -> bool:
    """Forest plot of the paired effects (finding 1, finding 3 in top-1 and ECE) with 95% CIs, per condition."""
    panels = (("F1: top-1 CQKD − supervised", lambda r: r["finding"] == 1 and "best by val" in r["what"]),
              ("F3: top-1 calibrated − uncalibrated teacher", lambda r: r["finding"] == 3 and r["what"].startswith("top-1")),
              ("F3: ECE calibrated − uncalibrated teacher", lambda r: r["finding"] == 3 and r["what"].startswith("ECE")))
    entries = [[(f"{label.split(' (')[0]}" + (f", {r['what'].rsplit(' at ', 1)[1]}" if " at T=" in r["what"] else ""), r)
                for conds in groups.values() for label, rows in conds for r in rows if keep(r)]
               for _, keep in panels]
    if not any(entries):
        return False
    plt = _plt()
    height = max(len(e) for e in entries) * 0.32 + 1.2
    fig, axes = plt.subplots(1, 3, figsize=(15, height))
    colors = {"holds": "tab:green", "reverses": "tab:red", "inconclusive": "tab:gray"}
    for ax, (title, _), rows in zip(axes, panels, entries):
        for i, (label, r) in enumerate(rows):
            lo, hi = r["ci"]
            ax.errorbar(r["estimate"], i, xerr=[[r["estimate"] - lo], [hi - r["estimate"]]], fmt="o",
                        color=colors.get(r["verdict"], "black"), capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.suptitle("Paired effects with 95% bootstrap CIs (green: holds, red: reverses, grey: inconclusive)")
    fig.tight_layout()
    _save(fig, path)
    return True
