"""The methods comparison of a sweep report (cqkd.analysis.methods) on rows with known test top-1."""

from __future__ import annotations

import pytest
from test_sweep import _row

from cqkd.analysis.methods import (
    arms,
    calibration_effects,
    comparison,
    kd_reference,
    methods_section,
)
from cqkd.core.text import markdown_table


def _rows(tmp_path):
    rows = []
    for seed in range(3):
        rows.append(_row(tmp_path, "supervised", 7, seed, 0.70, 0.70))
        # KD: T=4 is best on val (0.72 > 0.71) though T=1 is better on test: the reference must be T=4
        rows.append(_row(tmp_path, "distill", 7, seed, 0.74, 0.71, temperature=1.0))
        rows.append(_row(tmp_path, "distill", 7, seed, 0.72, 0.72, temperature=4.0))
        rows.append(_row(tmp_path, "distill", 7, seed, 0.76, 0.73, temperature=4.0, method="dkd"))
        rows.append(_row(tmp_path, "distill", 7, seed, 0.78, 0.73, temperature=4.0, method="dkd",
                         teacher_calibration="temperature"))
        rows.append(_row(tmp_path, "distill", 7, seed, 0.70, 0.70, temperature=4.0, alpha=0.0))  # control: left out
    return rows


def test_arms_group_by_method_temperature_calibration_and_size(tmp_path):
    found = arms(_rows(tmp_path))
    assert [(a.method, a.temperature, a.tcal, len(a.rows)) for a in found] == [
        ("kd", "1", "none", 3), ("kd", "4", "none", 3), ("dkd", "4", "none", 3), ("dkd", "4", "temperature", 3)]
    assert kd_reference(found, 7).temperature == "4"


def test_effects_against_supervised_and_the_kd_chosen_on_val(tmp_path):
    by = {(e["arm"].method, e["arm"].temperature, e["arm"].tcal): e for e in comparison(_rows(tmp_path))}
    dkd = by[("dkd", "4", "none")]
    assert dkd["sup_top1"].mean == pytest.approx(0.06) and dkd["sup_top1"].ci_low > 0  # 0.76 - 0.70
    assert dkd["kd_top1"].mean == pytest.approx(0.04)  # against KD T=4 (chosen on val), not T=1
    assert by[("kd", "4", "none")]["kd_top1"] is None  # the reference is not compared with itself
    assert by[("kd", "1", "none")]["kd_top1"].mean == pytest.approx(0.02)
    assert dkd["label"] == "dkd" and by[("kd", "1", "none")]["label"] == "kd T=1"


def test_teacher_calibration_effect_per_method(tmp_path):
    cal = calibration_effects(_rows(tmp_path))
    assert [(c["method"], c["T"]) for c in cal] == [("dkd", "4")]
    assert cal[0]["top1"].mean == pytest.approx(0.02) and cal[0]["n"] == 3


def test_section_names_the_methods_that_beat_supervised(tmp_path):
    text = "\n".join(methods_section(_rows(tmp_path), markdown_table))
    assert "KD reference: T=4" in text and "Does teacher calibration help each method?" in text
    beat = [line for line in text.splitlines() if line.startswith("**Beat supervised")][0]
    assert "dkd (none)" in beat and "kd T=1 (none)" in beat
