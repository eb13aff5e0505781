"""Tests of cqkd.calibration.bootstrap, the one bootstrap engine of ``cqkd evaluate --bootstrap``
and the study: reproducible intervals, replicates equal to the plain metrics on explicit
resamples, and each run's own ECE bin count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cqkd.analysis import stats as S
from cqkd.calibration import bootstrap as B
from cqkd.calibration import metrics as M

# --- bootstrap -----------------------------------------------------------------------------

def _random_case(n: int = 1000, k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    labels = torch.distributions.Categorical(logits=logits * 0.7).sample()
    return logits, labels


def test_bootstrap_is_reproducible_and_brackets_the_estimate() -> None:
    logits, labels = _random_case()
    a = B.bootstrap_intervals(logits, labels, n=500, seed=0)
    b = B.bootstrap_intervals(logits, labels, n=500, seed=0)
    c = B.bootstrap_intervals(logits, labels, n=500, seed=1)
    assert a == b and a != c
    full = M.all_metrics(logits, labels)
    for key in ("top1", "nll", "ece"):
        assert a[key]["value"] == pytest.approx(full[key])
        assert a[key]["low"] < a[key]["value"] < a[key]["high"], key


def test_bootstrap_top1_width_matches_the_binomial() -> None:
    # the 95% interval of a proportion p from N samples is about ±1.96·sqrt(p(1-p)/N)
    logits, labels = _random_case(n=2000)
    iv = B.bootstrap_intervals(logits, labels, n=1000, seed=0)["top1"]
    p = iv["value"]
    half = 1.96 * math.sqrt(p * (1 - p) / 2000)
    assert (iv["high"] - iv["low"]) / 2 == pytest.approx(half, rel=0.15)


def test_bootstrap_replicates_match_explicit_resamples() -> None:
    # the vectorised replicates against the plain metrics on the same resamples
    logits, labels = _random_case(n=300, seed=3)
    reps = B.bootstrap_replicates(logits, labels, n=40, seed=7, ece_bins=10)
    rows = torch.cat(list(B.bootstrap_indices(40, 300, seed=7)))
    assert rows.shape == (40, 300)
    for r, idx in enumerate(rows):
        assert float(reps["top1"][r]) == pytest.approx(M.top1(logits[idx], labels[idx]), abs=1e-12)
        assert float(reps["nll"][r]) == pytest.approx(M.nll(logits[idx], labels[idx]), abs=1e-9)
        assert float(reps["ece"][r]) == pytest.approx(M.ece(logits[idx], labels[idx], 10), abs=1e-9)
    iv = B.bootstrap_intervals(logits, labels, n=40, seed=7, ece_bins=10)["ece"]
    lo, hi = torch.quantile(reps["ece"], torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert iv["low"] == pytest.approx(lo, abs=1e-12) and iv["high"] == pytest.approx(hi, abs=1e-12)


def test_bootstrap_of_a_perfect_classifier_is_degenerate() -> None:
    labels = torch.arange(50) % 5
    logits = torch.nn.functional.one_hot(labels, 5).double() * 50
    iv = B.bootstrap_intervals(logits, labels, n=200)
    assert iv["top1"] == {"value": 1.0, "low": 1.0, "high": 1.0}


def test_per_image_keeps_the_runs_bin_count() -> None:
    # the engine's ECE of a run with M bins equals calibration_errors with M bins, for M != 15 too
    logits, labels = _random_case(n=400, seed=5)
    for bins in (1, 7, 15, 40):
        run = B.per_image(logits.numpy(), labels.numpy(), bins)
        assert run.ece_bins == bins
        assert B.metric_value("ece", run) == pytest.approx(M.ece(logits, labels, bins), abs=1e-9), bins
    with pytest.raises(ValueError, match="ece_bins"):
        B.per_image(logits.numpy(), labels.numpy(), 0)


def test_runs_with_different_bin_counts_compare_each_with_its_own_bins() -> None:
    # a paired effect of one run against itself under 10 and 20 bins: the per-seed difference is
    # exactly ECE_10 - ECE_20 of that run (padding the 10-bin features with zero columns adds nothing)
    logits, labels = _random_case(n=300, seed=9)
    a = {0: B.per_image(logits.numpy(), labels.numpy(), 10)}
    b = {0: B.per_image(logits.numpy(), labels.numpy(), 20)}
    e = S.paired_effect(a, b, "ece", sign=-1, n_boot=50)
    expected = M.ece(logits, labels, 10) - M.ece(logits, labels, 20)
    assert e.mean == pytest.approx(expected, abs=1e-9)
    assert B.stack([a[0], b[0]], "ece").shape == (300, 2, 20)


def test_evaluate_and_the_study_share_one_engine() -> None:
    # the study's per-image values, the metrics of evaluate and the replicates are one implementation
    assert S.per_image is B.per_image and S.PerImage is B.PerImage and S.metric_values is B.metric_values
    logits, labels = _random_case(n=200, seed=2)
    reps = B.bootstrap_replicates(logits, labels, n=5, seed=3, ece_bins=12)
    run = B.per_image(logits.numpy(), labels.numpy(), 12)
    rows = torch.cat(list(B.bootstrap_indices(5, 200, seed=3)))
    weights = np.stack([np.bincount(r.numpy(), minlength=200) for r in rows])
    np.testing.assert_allclose(reps["ece"].numpy(), B.metric_values("ece", run, weights), atol=1e-12)


def test_the_study_takes_each_runs_bin_count(tmp_path) -> None:
    # from the report row, else the run's metrics.json, else the default 15
    from cqkd.analysis.findings import _ece_bins
    from cqkd.core.io import write_json

    assert _ece_bins({"path": str(tmp_path), "ece_bins": 10}) == 10
    assert _ece_bins({"path": str(tmp_path)}) == 15  # nothing to read: the default
    write_json(tmp_path / "metrics.json", {"ece_bins": 20})
    assert _ece_bins({"path": str(tmp_path), "ece_bins": ""}) == 20
