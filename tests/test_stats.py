"""Tests of cqkd.analysis.stats: golden metric values, bootstrap effects of known size,
trend shapes over a temperature series and permutation p-values of correlations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from cqkd.analysis import stats as S

# --- golden values ------------------------------------------------------------------------
# Logits log(p) of four 3-class images (softmax gives p back), labels [0, 2, 1, 2]:
#   p = [0.70, 0.20, 0.10] correct, conf 0.70 -> bin 10 = (10/15, 11/15] = (0.667, 0.733]
#   p = [0.10, 0.72, 0.18] wrong,   conf 0.72 -> bin 10
#   p = [0.50, 0.30, 0.20] wrong,   conf 0.50 -> bin 7  = (0.467, 0.533]
#   p = [0.05, 0.05, 0.90] correct, conf 0.90 -> bin 13 = (0.867, 0.933]
# top1 = 2/4 = 0.5
# ECE  = 2/4·|0.5 - 0.71| + 1/4·|0 - 0.5| + 1/4·|1 - 0.9| = 0.105 + 0.125 + 0.025 = 0.255
# NLL  = (-ln 0.7 - ln 0.18 - ln 0.3 - ln 0.9)/4 = (0.356675 + 1.714798 + 1.203973 + 0.105361)/4
#      = 0.845202
# entropy = (0.801819 + 0.775446 + 1.029653 + 0.394398)/4 = 0.750329
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.72, 0.18], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9]])
LABELS = np.array([0, 2, 1, 2])
GOLDEN = {"top1": 0.5, "ece": 0.255, "nll": 0.845202, "entropy": 0.750329}


def loop_ece(conf, correct, n_bins=15) -> float:
    """Straightforward ECE: bins (b/M, (b+1)/M], the first also holding 0."""
    n, total = len(conf), 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def test_per_image_and_metrics_golden():
    # A per-row constant shift must not change anything (softmax invariance).
    run = S.per_image(np.log(PROBS) + np.array([[3.0], [-2.0], [0.0], [50.0]]), LABELS)
    np.testing.assert_array_equal(run.correct, [True, False, False, True])
    np.testing.assert_allclose(run.confidence, [0.7, 0.72, 0.5, 0.9], rtol=1e-12)
    np.testing.assert_allclose(run.nll, -np.log(PROBS[np.arange(4), LABELS]), rtol=1e-12)
    np.testing.assert_allclose(run.entropy, [-sum(q * math.log(q) for q in p) for p in PROBS], rtol=1e-12)
    for metric, expected in GOLDEN.items():
        assert S.metric_value(metric, run) == pytest.approx(expected, abs=1e-6), metric
        assert S.metric_values(metric, run, np.ones((1, 4)))[0] == pytest.approx(expected, abs=1e-6)
    assert S.metric_value("ece", run) == pytest.approx(loop_ece(run.confidence, run.correct), abs=1e-12)


def test_per_image_is_stable_for_huge_logits():
    run = S.per_image(np.array([[1000.0, 0.0, -1000.0], [0.0, 800.0, 0.0]]), np.array([1, 1]))
    np.testing.assert_allclose(run.nll, [1000.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(run.confidence, [1.0, 1.0])
    assert np.all(np.isfinite(run.entropy)) and np.all(run.entropy < 1e-12)


def test_bin_edges_match_the_runs_ece():
    """[b/M, (b+1)/M) with 1 in the last bin, as cqkd.calibration.metrics: the study's ECE of a
    run equals the ECE in its metrics.json."""
    import torch

    from cqkd.calibration import metrics as M

    edges = np.linspace(0, 1, 16)
    assert list(S.bin_index(np.array([edges[5], np.nextafter(edges[5], 0), 1.0, 1e-9, 0.0]))) == [5, 4, 14, 0, 0]
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(500, 10)) * 3, rng.integers(0, 10, 500)
    expected = M.ece(torch.tensor(logits), torch.tensor(labels), 15)
    assert S.metric_value("ece", S.per_image(logits, labels)) == pytest.approx(float(expected), abs=1e-9)


def test_weighted_metrics_equal_metrics_of_the_resampled_images():
    rng = np.random.default_rng(3)
    run = S.per_image(rng.normal(size=(300, 10)) * 2, rng.integers(0, 10, 300))
    weights = np.stack([np.bincount(rng.integers(0, 300, 300), minlength=300) for _ in range(6)])
    for metric in S.METRICS:
        got = S.metric_values(metric, run, weights)
        for r, w in enumerate(weights):
            idx = np.repeat(np.arange(300), w)
            c, conf = run.correct[idx], run.confidence[idx]
            expected = {"top1": c.mean(), "ece": loop_ece(conf, c), "entropy": run.entropy[idx].mean(),
                        "nll": run.nll[idx].mean()}[metric]
            assert got[r] == pytest.approx(expected, abs=1e-12), (metric, r)
    # float32 weights (the bootstrap's) agree to float32 precision
    np.testing.assert_allclose(S.metric_values("ece", run, weights.astype(np.float32)),
                               S.metric_values("ece", run, weights), atol=1e-6)
    with pytest.raises(ValueError):
        S.metric_values("brier", run, weights)


# --- paired effects -----------------------------------------------------------------------
N, SEEDS, TRUE = 5000, range(5), 0.03


def arm(q: np.ndarray, seed: int) -> S.PerImage:
    """Per-image values with correctness ~ Bernoulli(q_i); the other arrays are filler."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, len(q))
    return S.PerImage(rng.random(len(q)) < q, conf, rng.uniform(0, 2, len(q)), rng.exponential(size=len(q)))


@pytest.fixture(scope="module")
def difficulty() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.6, 0.95, N)


def test_known_effect_is_found(difficulty):
    a = {s: arm(difficulty + TRUE / 2, 100 + s) for s in SEEDS}
    b = {s: arm(difficulty - TRUE / 2, 200 + s) for s in SEEDS}
    e = S.paired_effect(a, b, "top1", sign=+1)
    assert e.n_seeds == 5 and e.verdict == "holds"
    assert e.ci_low < TRUE < e.ci_high and 0 < e.ci_low
    assert e.mean == pytest.approx(TRUE, abs=0.008)
    assert e.mean == pytest.approx(np.mean([S.metric_value("top1", a[s]) - S.metric_value("top1", b[s])
                                            for s in SEEDS]), abs=1e-12)
    per_a = [S.metric_value("top1", a[s]) for s in SEEDS]
    per_b = [S.metric_value("top1", b[s]) for s in SEEDS]
    assert e.p == pytest.approx(sps.ttest_rel(per_a, per_b).pvalue) and e.p < 0.05
    assert 0.002 < e.se < 0.01 and e.mde == pytest.approx(2.8016 * e.se, rel=1e-3)
    assert S.paired_effect(a, b, "top1", sign=-1).verdict == "reverses"
    assert S.paired_effect(b, a, "top1", sign=-1).verdict == "holds"
    assert S.paired_effect(a, b, "top1", sign=+1) == e  # deterministic for a seed


def test_zero_effect_is_inconclusive(difficulty):
    a = {s: arm(difficulty, 300 + s) for s in SEEDS}
    b = {s: arm(difficulty, 400 + s) for s in SEEDS}
    for sign in (+1, -1):
        e = S.paired_effect(a, b, "top1", sign=sign)
        assert e.verdict == "inconclusive" and e.ci_low < 0 < e.ci_high
        assert 0.005 < e.mde < 0.03 and e.p > 0.05
    e = S.paired_effect(a, b, "ece", sign=+1, n_boot=500)
    assert e.verdict == "inconclusive" and e.mde > 0


def test_bootstrap_resamples_seeds_and_pairs_images(difficulty):
    base = {s: arm(difficulty, 500 + s) for s in SEEDS}

    def flipped(run: S.PerImage, k: int) -> S.PerImage:  # k wrong images made correct
        correct = run.correct.copy()
        correct[np.flatnonzero(~correct)[:k]] = True
        return S.PerImage(correct, run.confidence, run.entropy, run.nll)

    # Same images, +100 correct in every seed: only the 100 flipped images vary under a paired
    # image resample (se ≈ sqrt(100)/N = 0.002); unpaired resampling would give se ≈ 0.008.
    e = S.paired_effect({s: flipped(base[s], 100) for s in SEEDS}, base, "top1", sign=+1)
    assert e.mean == pytest.approx(100 / N) and e.ci_low < 100 / N < e.ci_high
    assert 0.001 < e.se < 0.003 and e.verdict == "holds"
    # Effects that vary strongly between seeds (+0.06 ... -0.04): the seed resample widens the CI.
    ks = [300, -200, 250, -150, 50]
    a = {s: flipped(base[s], max(k, 0)) for s, k in zip(SEEDS, ks)}
    b = {s: flipped(base[s], max(-k, 0)) for s, k in zip(SEEDS, ks)}
    e = S.paired_effect(a, b, "top1", sign=+1)
    assert e.mean == pytest.approx(np.mean(ks) / N) and e.se > 0.015 and e.verdict == "inconclusive"


def test_paired_effect_input_checks(difficulty):
    a = {s: arm(difficulty, s) for s in SEEDS}
    with pytest.raises(ValueError, match="same"):
        S.paired_effect(a, {s: a[s] for s in range(4)}, "top1", sign=+1)
    with pytest.raises(ValueError, match="sign"):
        S.paired_effect(a, a, "top1", sign=0)
    one = S.paired_effect({0: a[0]}, {0: a[1]}, "nll", sign=+1, n_boot=200)
    assert one.n_seeds == 1 and math.isnan(one.p) and one.se > 0


def test_format_effect():
    e = S.Effect("top1", 0.0046, 0.0012, 0.0081, 0.03, 5, 0.0017, 0.0048, +1, "holds")
    assert S.format_effect(e) == "+0.0046 [+0.0012, +0.0081], p=0.03, 5 seeds"
    e1 = S.Effect("ece", -0.01, -0.02, 0.001, float("nan"), 1, 0.005, 0.014, +1, "inconclusive")
    assert S.format_effect(e1, digits=3) == "-0.010 [-0.020, +0.001], p=n/a, 1 seed"
    assert S.format_p(0.0004) == "p<0.001"


# --- trends over T -------------------------------------------------------------------------
TS = np.array([1, 2, 4, 8, 16, 32])


def series(f, noise=0.002, seed=0):
    """T, value, seed group for 5 seeds per T with value = f(log2 T) + noise."""
    rng = np.random.default_rng(seed)
    t = np.repeat(TS, 5)
    return t, f(np.log2(t)) + rng.normal(0, noise, len(t)), np.tile(np.arange(5), len(TS))


def test_u_shaped_series():
    t, v, g = series(lambda x: 0.01 * (x - 2) ** 2)
    tr = S.trend(t, v, sign=+1, groups=g)
    assert tr.shape == "U-shaped: falls from T=1 to T=4, then rises to T=32"
    assert tr.turn == 4 and tr.slope_before < 0 < tr.slope_after
    assert tr.p_before < 0.05 and tr.p_after < 0.05 and tr.null == "within groups"
    assert tr.levels == tuple(map(float, TS)) and np.argmin(tr.means) == 2
    assert "U-shaped" in S.format_trend(tr) and "T=4" in S.format_trend(tr)
    cap = S.trend(t, -v, sign=+1, groups=g)
    assert cap.shape == "∩-shaped: rises from T=1 to T=4, then falls to T=32" and cap.turn == 4


def test_monotone_and_flat_series():
    t, v, g = series(lambda x: 0.01 * x)
    up = S.trend(t, v, sign=+1, groups=g)
    assert up.shape == "increasing" and up.verdict == "holds" and up.rho > 0.9 and up.p < 0.001
    assert up.turn is None and math.isnan(up.slope_before)
    assert S.trend(t, v, sign=-1).verdict == "reverses"
    assert S.trend(t, -v, sign=-1).shape == "decreasing"
    assert S.format_trend(up) == f"ρ={up.rho:+.2f}, p<0.001, n=30; increasing"
    # Shuffling the points changes nothing (the within-group permutation reorders them itself).
    shuffle = np.random.default_rng(1).permutation(len(t))
    again = S.trend(t[shuffle], v[shuffle], sign=+1, groups=g[shuffle])
    assert again.rho == pytest.approx(up.rho) and again.p < 0.001 and again.shape == "increasing"
    t, v, g = series(lambda x: 0 * x, noise=0.01, seed=5)
    flat = S.trend(t, v, sign=+1, groups=g)
    assert flat.shape == "flat" and flat.verdict == "inconclusive" and flat.p > 0.05
    # unequal groups cannot be permuted within groups by 'pairings': pooled instead
    assert S.trend(t[1:], v[1:], sign=+1, groups=g[1:]).null == "pooled"


def test_within_group_permutation_removes_seed_offsets():
    # Large per-seed offsets hide a small common slope from the pooled permutation test only.
    rng = np.random.default_rng(11)
    t, g = np.repeat(TS, 5), np.tile(np.arange(5), len(TS))
    v = np.array([-0.1, -0.05, 0, 0.05, 0.1])[g] + 0.002 * np.log2(t) + rng.normal(0, 0.001, len(t))
    shuffle = rng.permutation(len(t))
    t, v, g = t[shuffle], v[shuffle], g[shuffle]
    within, pooled = S.trend(t, v, sign=+1, groups=g), S.trend(t, v, sign=+1)
    assert within.rho == pooled.rho and within.null == "within groups" and pooled.null == "pooled"
    assert within.p < 0.001 and within.verdict == "holds" and within.shape == "increasing"
    assert pooled.p > 0.1 and pooled.verdict == "inconclusive"


def test_turn_without_significant_slopes_is_not_a_u():
    # Per-T means exactly a shallow U, but the spread around them is 25x its depth.
    rng = np.random.default_rng(2)
    t, g = np.repeat(TS, 5), np.tile(np.arange(5), len(TS))
    noise = rng.normal(0, 0.05, (len(TS), 5))
    v = (0.002 * (np.log2(TS) - 2) ** 2)[:, None] + noise - noise.mean(1, keepdims=True)
    tr = S.trend(t, v.ravel(), sign=+1, groups=g)
    assert tr.shape == "flat" and tr.turn == 4 and tr.p_before > 0.05
    assert "flat (slope per doubling of T" in S.format_trend(tr)


# --- correlations -------------------------------------------------------------------------
def test_correlation_permutation_p():
    rng = np.random.default_rng(7)
    x = rng.normal(size=20)
    strong = S.correlation(x, 0.5 * x + rng.normal(0, 0.1, 20), sign=+1)
    assert strong.r > 0.95 and strong.p < 0.001 and strong.verdict == "holds"
    assert S.correlation(x, -x + rng.normal(0, 0.1, 20), sign=+1).verdict == "reverses"
    y = rng.normal(size=20)
    noise = S.correlation(x, y, sign=+1)
    assert noise.p > 0.2 and noise.verdict == "inconclusive"
    assert noise.r == pytest.approx(sps.pearsonr(x, y).statistic)
    assert noise.p == pytest.approx(sps.pearsonr(x, y).pvalue, abs=0.03)  # permutation ≈ t-based p
    assert S.format_correlation(strong).startswith(f"r={strong.r:+.2f}, p<0.001, n=20")


def test_paired_p_of_nearly_equal_differences_is_quiet(recwarn):
    """Seeds whose differences agree to the last bits make scipy warn of precision loss; the report
    prints no library warning (the p is still given, beside the bootstrap interval)."""
    from cqkd.analysis.stats import paired_p

    a = np.array([0.8, 0.81, 0.82])
    p = paired_p(a + 0.0025, a)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert p < 0.05 or np.isnan(p)
