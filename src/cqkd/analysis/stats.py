"""Statistics of a study that compares trained classifiers ("runs") on one shared test set.

Runs are reduced to per-test-image values (:class:`PerImage`, each with its run's own ECE bin
count) and resampled through the one bootstrap engine, ``cqkd.calibration.bootstrap``.
Verdicts compare a result with the direction the paper predicts (``sign`` = +1 or -1): "holds"
(significant, that side), "reverses" (significant, the other side) or "inconclusive".
numpy/scipy, no I/O; callers convert tensors with ``.numpy()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from cqkd.calibration.bootstrap import (
    ECE_BINS,
    METRICS,
    PerImage,
    bin_index,
    evaluate,
    image_weights,
    metric_value,
    metric_values,
    per_image,
    stack,
)

__all__ = ["ECE_BINS", "METRICS", "PerImage", "bin_index", "metric_value", "metric_values", "per_image",
           "paired_effect", "correlation", "trend", "format_p", "format_effect", "format_trend",
           "format_correlation", "Effect", "Correlation", "Trend"]

ALPHA = 0.05
MDE_FACTOR = float(stats.norm.ppf(0.975) + stats.norm.ppf(0.8))  # ≈ 2.80: 80 % power, two-sided 5 %
TURN_RHO = 0.8  # |Spearman ρ| of the per-T means required on each side of a turn
_CHUNK = 256  # bootstrap replicates per matrix product (bounds memory)


def _check_sign(sign: int) -> None:
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1 (the predicted direction), got {sign!r}")


def _verdict(positive: bool, negative: bool, sign: int) -> str:
    """Verdict from whether the result is significantly positive / negative."""
    if not (positive or negative):
        return "inconclusive"
    return "holds" if (positive if sign > 0 else negative) else "reverses"


@dataclass(frozen=True)
class Effect:
    """Paired difference a - b of a metric, averaged over seeds, with bootstrap CI and t-test."""
    metric: str
    mean: float
    ci_low: float
    ci_high: float
    p: float
    n_seeds: int
    se: float
    mde: float
    sign: int
    verdict: str


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided paired t-test p over seeds. Where the per-seed differences are (nearly) equal, scipy
    warns of precision loss and gives p from a huge t (or nan where they are exactly equal); the
    report shows that p without the warning, beside its bootstrap interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_rel(a, b).pvalue)


def paired_effect(a: dict[int, PerImage], b: dict[int, PerImage], metric: str, sign: int,
                  n_boot: int = 2000, seed: int = 0) -> Effect:
    """Mean over seeds of metric(a_s) - metric(b_s), with a seed-and-image bootstrap CI.

    Each replicate resamples the seeds and the test images with replacement; the image
    resample is shared by both arms and all seeds (images are paired). CI: 95 % percentile;
    se: bootstrap std; mde = 2.80 se; p: two-sided paired t-test over seeds (nan if < 2).
    """
    _check_sign(sign)
    if set(a) != set(b) or not a:
        raise ValueError(f"both arms need the same non-empty seeds; only in a: {sorted(set(a) - set(b))}, "
                         f"only in b: {sorted(set(b) - set(a))}")
    seeds = sorted(a)
    s, features = len(seeds), stack([a[k] for k in seeds] + [b[k] for k in seeds], metric)
    n = features.shape[0]
    point = evaluate(metric, features, np.ones((1, n)))[0]
    per_seed_a, per_seed_b = point[:s], point[s:]
    p = paired_p(per_seed_a, per_seed_b) if s >= 2 else float("nan")
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)  # (n_boot, s)
    boot = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        reps = min(_CHUNK, n_boot - start)
        m = evaluate(metric, features, image_weights(rng, reps, n))
        boot[start:start + reps] = (seed_counts[start:start + reps] * (m[:, :s] - m[:, s:])).sum(1) / s
    lo, hi = np.percentile(boot, [2.5, 97.5])
    se = float(boot.std(ddof=1)) if n_boot > 1 else float("nan")
    return Effect(metric, float(np.mean(per_seed_a - per_seed_b)), float(lo), float(hi), p, s, se,
                  MDE_FACTOR * se, sign, _verdict(lo > 0, hi < 0, sign))


def _pearson_against(x: np.ndarray):
    """Vectorised statistic for permutation_test: Pearson r of fixed x with the samples joined."""
    xc = (x - x.mean()) / np.linalg.norm(x - x.mean())

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        y = np.concatenate(samples, axis=-1)
        yc = y - y.mean(axis=-1, keepdims=True)
        return (yc @ xc) / np.linalg.norm(yc, axis=-1)

    return statistic


def _perm_p(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_perm: int, seed: int) -> tuple[float, str]:
    """Two-sided permutation p of Pearson r(x, y), permuting y within groups when possible."""
    samples, null = (y,), "pooled"
    if groups is not None:
        groups = np.asarray(groups)
        labels, counts = np.unique(groups, return_counts=True)
        if len(set(counts)) == 1 and counts[0] >= 2:  # 'pairings' needs equal-sized samples
            order = np.argsort(groups, kind="stable")
            x, samples, null = x[order], tuple(y[order].reshape(len(labels), -1)), "within groups"
    res = stats.permutation_test(samples, _pearson_against(x), permutation_type="pairings",
                                 vectorized=True, n_resamples=n_perm, rng=np.random.default_rng(seed))
    return float(res.pvalue), null


@dataclass(frozen=True)
class Correlation:
    """Pearson r of two quantities over points (e.g. runs), with a permutation p-value."""
    r: float
    p: float
    n: int
    sign: int
    verdict: str


@dataclass(frozen=True)
class Trend:
    """Spearman ρ of a value against T, its permutation p, and the shape of the per-T means."""
    rho: float
    p: float
    n: int
    sign: int
    verdict: str
    shape: str
    levels: tuple[float, ...]  # the distinct T, ascending
    means: tuple[float, ...]  # the mean value at each of them
    null: str  # how the permutation test permuted: "within groups", "pooled" ("none": constant data)
    turn: float | None = None
    slope_before: float = float("nan")  # per doubling of T, up to the turn
    p_before: float = float("nan")
    slope_after: float = float("nan")  # from the turn on
    p_after: float = float("nan")


def _as_points(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 3:
        raise ValueError(f"need two 1-D arrays of one length >= 3, got {x.shape} and {y.shape}")
    return x, y


def correlation(x: np.ndarray, y: np.ndarray, sign: int, n_perm: int = 9999, seed: int = 0) -> Correlation:
    """Pearson r(x, y) with a two-sided permutation p (scipy permutation_test, pairings)."""
    _check_sign(sign)
    x, y = _as_points(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(float("nan"), float("nan"), len(x), sign, "inconclusive")
    r = float(stats.pearsonr(x, y).statistic)
    p, _ = _perm_p(x, y, None, n_perm, seed)
    return Correlation(r, p, len(x), sign, _verdict(p < ALPHA and r > 0, p < ALPHA and r < 0, sign))


def _turn(t: np.ndarray, v: np.ndarray, levels: np.ndarray, means: np.ndarray) -> tuple[bool, str, dict]:
    """(established, U/∩ shape text, Trend turn fields) of the qualifying turn; see trend()."""
    best: tuple[bool, str, dict] = (False, "", {})
    for kind, k, after in (("U", int(np.argmin(means)), 1), ("∩", int(np.argmax(means)), -1)):
        if not 2 <= k <= len(levels) - 3:  # >= 3 distinct T on each side, turn included
            continue
        rho_b = stats.spearmanr(levels[:k + 1], means[:k + 1]).statistic
        rho_a = stats.spearmanr(levels[k:], means[k:]).statistic
        if not (after * rho_b <= -TURN_RHO and after * rho_a >= TURN_RHO) or best[0]:
            continue
        x, left, right = np.log2(t), t <= levels[k], t >= levels[k]
        fb, fa = stats.linregress(x[left], v[left]), stats.linregress(x[right], v[right])
        established = after * fb.slope < 0 < after * fa.slope and max(fb.pvalue, fa.pvalue) < ALPHA
        first, second = ("falls", "rises") if after > 0 else ("rises", "falls")
        text = f"{kind}-shaped: {first} from T={levels[0]:g} to T={levels[k]:g}, then {second} to T={levels[-1]:g}"
        fields = dict(turn=float(levels[k]), slope_before=float(fb.slope), p_before=float(fb.pvalue),
                      slope_after=float(fa.slope), p_after=float(fa.pvalue))
        if established or not best[2]:
            best = (bool(established), text, fields)
    return best


def trend(T: np.ndarray, value: np.ndarray, sign: int, groups: np.ndarray | None = None,
          n_perm: int = 9999, seed: int = 0) -> Trend:
    """Monotone trend and shape of value against T over points (T_i, value_i), e.g. runs.

    rho: Spearman ρ over all points; p: two-sided permutation p of ρ (permutation_test,
    'pairings'): values are permuted within groups (e.g. seeds) when groups is given and all
    groups are equally large, otherwise over all points (``null`` says which was used).
    verdict: from p < 0.05 and the sign of ρ. shape, from the per-T means m_j (T_1 < ... < T_J):
    non-monotone ("U-shaped: falls from T=a to T=b, then rises to T=c", or "∩-shaped: rises
    ..., then falls ...") when the minimum (U) or maximum (∩) of m_j is at an interior T_k with
    >= 3 distinct T on each side (turn included in both), the Spearman ρ of m_j vs T_j is <= -0.8
    / >= +0.8 on the two sides (opposite signs), and the linear fits of value on log2 T over the
    points of each side have slopes of those signs, each with p < 0.05 (a "two-lines" test,
    Simonsohn 2018); otherwise "increasing"/"decreasing" when p < 0.05, else "flat". turn,
    slope_before/after (per doubling of T) and p_before/after describe the turn that passes the
    ρ rule even when its slopes are not significant (then shape is not U/∩); None/nan if none.
    """
    _check_sign(sign)
    t, v = _as_points(T, value)
    if np.any(t <= 0):
        raise ValueError("T must be positive (slopes are fitted against log2 T)")
    if groups is not None and np.shape(groups) != t.shape:
        raise ValueError(f"groups has shape {np.shape(groups)}, expected {t.shape}")
    levels = np.unique(t)
    means = np.array([v[t == level].mean() for level in levels])
    if np.ptp(t) == 0 or np.ptp(v) == 0:
        rho, p, null = float("nan"), float("nan"), "none"
    else:
        rho = float(stats.spearmanr(t, v).statistic)
        p, null = _perm_p(stats.rankdata(t), stats.rankdata(v), groups, n_perm, seed)
    established, text, turn = _turn(t, v, levels, means)
    shape = text if established else ("flat" if not p < ALPHA else "increasing" if rho > 0 else "decreasing")
    return Trend(rho, p, len(t), sign, _verdict(p < ALPHA and rho > 0, p < ALPHA and rho < 0, sign), shape,
                 tuple(map(float, levels)), tuple(map(float, means)), null, **turn)


def format_p(p: float) -> str:
    """'p=0.03', 'p<0.001' or 'p=n/a' (nan)."""
    return "p=n/a" if np.isnan(p) else "p<0.001" if p < 0.001 else f"p={p:.2g}"


def format_effect(e: Effect, digits: int = 4) -> str:
    """Markdown cell, e.g. '+0.0046 [+0.0012, +0.0081], p=0.03, 5 seeds'."""
    f = f"+.{digits}f"
    return (f"{e.mean:{f}} [{e.ci_low:{f}}, {e.ci_high:{f}}], {format_p(e.p)}, "
            f"{e.n_seeds} seed{'' if e.n_seeds == 1 else 's'}")


def format_trend(t: Trend) -> str:
    """Markdown cell, e.g. 'ρ=+0.82, p<0.001, n=30; increasing'."""
    out = f"ρ={t.rho:+.2f}, {format_p(t.p)}, n={t.n}; {t.shape}"
    if t.turn is not None:
        out += (f" (slope per doubling of T: {t.slope_before:+.2g}, {format_p(t.p_before)} up to "
                f"T={t.turn:g}; {t.slope_after:+.2g}, {format_p(t.p_after)} from there)")
    return out


def format_correlation(c: Correlation) -> str:
    """Markdown cell, e.g. 'r=+0.91, p<0.001, n=12'."""
    return f"r={c.r:+.2f}, {format_p(c.p)}, n={c.n}"
