"""The methods comparison: each distillation method against supervised training and against Hinton KD.

Every arm is a set of finished runs of one setting (method spec, T, teacher calibration, input
size) over seeds; an effect is ``stats.paired_effect`` of the two arms, paired by seed and by
test image. Hinton KD's reference setting at a size is the one with the best mean validation
top-1 among its uncalibrated settings (selected on val, never on test).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from cqkd.analysis import stats
from cqkd.analysis.findings import (
    _f,
    by_seed,
    has_soft_term,
    mean_std,
    setting_of,
    supervised_for,
)
from cqkd.analysis.findings import pm as _pm

DEFAULT_METHOD = "kd"
MIN_SEEDS = 3  # a method is said to beat supervised training only with at least this many paired seeds


@dataclass(frozen=True)
class Arm:
    """The finished runs of one distillation setting at one input size, over seeds."""

    method: str  # the method spec as configured (e.g. "kd", "dkd,beta=8")
    temperature: str  # T as configured
    tcal: str  # teacher calibration: "none" or "temperature"
    size: int
    rows: tuple[dict[str, Any], ...]

    @property
    def base(self) -> str:
        """The method's registered name (the spec before its first comma)."""
        return self.method.split(",")[0]

    def label(self, show_t: bool) -> str:
        """The arm's name in tables: the method spec, with T where the method's runs differ in it."""
        return self.method + (f" T={self.temperature}" if show_t else "")

    def mean(self, key: str) -> tuple[float, float, int]:
        """Mean, std and count over seeds of a metric."""
        return mean_std([_f(r, key) for r in self.rows])


def method_of(row: dict[str, Any]) -> str:
    """The method spec of a run (runs made before methods existed are Hinton KD)."""
    return str(row.get("method") or DEFAULT_METHOD)


def arms(rows: list[dict[str, Any]]) -> list[Arm]:
    """The distillation arms of a sweep (the alpha = 0 control left out), smallest size last."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["role"] == "distill" and r["state"] == "finished" and has_soft_term(r):
            groups[(method_of(r), *setting_of(r), int(r["size"]))].append(r)
    found = [Arm(m, t, c, s, tuple(rs)) for (m, t, c, s), rs in groups.items()]
    return sorted(found, key=lambda a: (-a.size, a.base != DEFAULT_METHOD, a.method, a.tcal, a.temperature))


def is_methods_sweep(rows: list[dict[str, Any]]) -> bool:
    """Whether the sweep's distilled runs use a method other than Hinton KD."""
    return any(a.base != DEFAULT_METHOD or a.method != DEFAULT_METHOD for a in arms(rows))


def _effect(a: list[dict[str, Any]], b: list[dict[str, Any]], metric: str, sign: int) -> stats.Effect | None:
    seeds = {int(r["seed"]) for r in a} & {int(r["seed"]) for r in b}
    if not seeds:
        return None
    return stats.paired_effect(by_seed([r for r in a if int(r["seed"]) in seeds]),
                               by_seed([r for r in b if int(r["seed"]) in seeds]), metric, sign)


def kd_reference(found: list[Arm], size: int) -> Arm | None:
    """Hinton KD's uncalibrated setting at ``size`` with the best mean validation top-1."""
    kd = [a for a in found if a.method == DEFAULT_METHOD and a.tcal == "none" and a.size == size]
    return max(kd, key=lambda a: a.mean("best_val_top1")[0], default=None)


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: its means, and its top-1 and ECE effects against supervised and against the KD reference."""
    found = arms(rows)
    t_varies = defaultdict(set)
    for a in found:
        t_varies[a.method].add(a.temperature)
    out = []
    for a in found:
        sup = supervised_for(rows, a.size)
        ref = kd_reference(found, a.size)
        entry: dict[str, Any] = {"arm": a, "label": a.label(len(t_varies[a.method]) > 1), "n": len(a.rows),
                                 "top1": a.mean("top1"), "ece": a.mean("ece"), "entropy": a.mean("entropy"),
                                 "val": a.mean("best_val_top1"), "kd_ref": ref}
        for name, other in (("sup", list(sup)), ("kd", list(ref.rows) if ref is not None and ref is not a else [])):
            entry[f"{name}_top1"] = _effect(list(a.rows), other, "top1", +1) if other else None
            entry[f"{name}_ece"] = _effect(list(a.rows), other, "ece", -1) if other else None
        out.append(entry)
    return out


def calibration_effects(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, T and size with both teacher calibrations: calibrated - uncalibrated, paired by seed."""
    by_key = {(a.method, a.temperature, a.size, a.tcal): a for a in arms(rows)}
    out = []
    for (method, t, size, tcal), a in by_key.items():
        other = by_key.get((method, t, size, "none"))
        if tcal == "none" or other is None:
            continue
        out.append({"method": method, "T": t, "size": size, "tcal": tcal, "n": len(a.rows),
                    "top1": _effect(list(a.rows), list(other.rows), "top1", +1),
                    "ece": _effect(list(a.rows), list(other.rows), "ece", -1)})
    return sorted(out, key=lambda e: (-e["size"], e["method"], e["T"]))


def _e(e: stats.Effect | None) -> str:
    if e is None:
        return "–"
    return f"{e.mean:+.4f} [{e.ci_low:+.4f}, {e.ci_high:+.4f}] {stats.format_p(e.p)}"


def methods_section(rows: list[dict[str, Any]], md_table) -> list[str]:
    """The report's methods section as Markdown lines (``md_table(headers, rows)`` draws a table)."""
    comp = comparison(rows)
    if not comp:
        return []
    lines = ["## Methods against supervised training and against Hinton KD", "",
             "Effects are paired by seed and test image: mean over seeds [95% bootstrap CI] and the paired "
             "t-test p over seeds (n/a with one seed, where the interval resamples test images only). "
             "Top-1: positive is better; ECE: negative is better. The KD reference at each size is "
             "Hinton KD's uncalibrated setting with the best validation top-1 (named in the table).", ""]
    beats = defaultdict(list)
    for size in sorted({e["arm"].size for e in comp}, reverse=True):
        block = [e for e in comp if e["arm"].size == size]
        ref = block[0]["kd_ref"]
        lines += [f"### {size} px" + (f" (KD reference: T={ref.temperature})" if ref else ""), ""]
        table = []
        for e in block:
            a = e["arm"]
            table.append([e["label"], a.tcal, e["n"], _pm(e["val"]), _pm(e["top1"]), _pm(e["ece"]),
                          _e(e["sup_top1"]), _e(e["sup_ece"]), _e(e["kd_top1"]), _e(e["kd_ece"])])
            if e["sup_top1"] is not None and e["sup_top1"].ci_low > 0 and e["sup_top1"].n_seeds >= MIN_SEEDS:
                beats[size].append(f"{e['label']} ({a.tcal})")
        lines.append(md_table(["method", "teacher cal.", "n", "val top-1", "test top-1", "ECE",
                               "Δ top-1 vs supervised", "Δ ECE vs supervised", "Δ top-1 vs KD", "Δ ECE vs KD"],
                              table))
    lines += [f"**Beat supervised training in top-1 (CI above 0, at least {MIN_SEEDS} seeds):** "
              + ("; ".join(f"{s} px: " + ", ".join(v) for s, v in beats.items()) if beats else "none") + ".", ""]
    cal = calibration_effects(rows)
    if cal:
        lines += ["### Does teacher calibration help each method?", "",
                  "Calibrated teacher (T_cal fitted on val) minus uncalibrated, same method, T, size and seeds.", ""]
        lines.append(md_table(["method", "T", "size", "n", "Δ top-1", "Δ ECE"],
                              [[c["method"], c["T"], c["size"], c["n"], _e(c["top1"]), _e(c["ece"])] for c in cal]))
    return lines
