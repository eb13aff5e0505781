"""The one bootstrap engine for top-1, ECE, entropy and NLL (``cqkd evaluate --bootstrap`` and the study).

A run's predictions are reduced to per-image values (:class:`PerImage`, with the run's own ECE
bin count); every metric is a weighted mean of per-image features, so one matrix product gives
it under many resamples at once, a resample being a row of image multiplicities. Two resamplers
feed it: ``bootstrap_indices`` (index rows from a seeded torch generator: the intervals of one
run) and ``image_weights`` (multiplicities from a numpy generator: the paired effects of the
study, ``cqkd.analysis.stats``). ECE bins are those of ``cqkd.calibration.metrics.bin_index``, so
a run's ECE here equals the ECE in its metrics.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy import special

from cqkd.calibration import metrics

METRICS = ("top1", "ece", "entropy", "nll")
ECE_BINS = 15  # the default of every run (RunConfig.ece_bins)


@dataclass(frozen=True, eq=False)
class PerImage:
    """One run's per-test-image values: top-1 correctness, confidence, entropy (nats), NLL, and
    the number of equal-width bins of its ECE."""
    correct: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    nll: np.ndarray
    ece_bins: int = ECE_BINS

    def __post_init__(self) -> None:
        for name in ("correct", "confidence", "entropy", "nll"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=bool if name == "correct" else float))
        shapes = {np.shape(getattr(self, name)) for name in ("correct", "confidence", "entropy", "nll")}
        if len(shapes) != 1 or len(self.correct.shape) != 1:
            raise ValueError(f"PerImage arrays must all be 1-D of one length, got shapes {shapes}")
        if not (isinstance(self.ece_bins, int) and self.ece_bins >= 1):
            raise ValueError(f"ece_bins must be a positive integer, got {self.ece_bins!r}")

    @property
    def n(self) -> int:
        """The number of images."""
        return len(self.correct)


def per_image(logits: np.ndarray, labels: np.ndarray, ece_bins: int = ECE_BINS) -> PerImage:
    """Per-image values of logits (N, K) against labels (N,), via a float64 log-softmax."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, K) and labels (N,), got {logits.shape} and {labels.shape}")
    logp = special.log_softmax(logits, axis=1)
    p = np.exp(logp)
    pred, rows = logp.argmax(1), np.arange(len(labels))
    with np.errstate(invalid="ignore"):  # p = 0 where logp = -inf: those terms are 0
        entropy = -np.where(p > 0, p * logp, 0.0).sum(1)
    return PerImage(pred == labels, p[rows, pred], entropy, -logp[rows, labels], ece_bins)


def bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each confidence: ``cqkd.calibration.metrics.bin_index`` itself."""
    return metrics.bin_index(torch.from_numpy(np.asarray(confidence, dtype=np.float64)), n_bins).numpy()


def features(run: PerImage, metric: str, width: int | None = None) -> np.ndarray:
    """(N, k) per-image features whose weighted sums give the metric (see ``evaluate``).

    For ECE, k = ``width`` (at least the run's bin count; extra columns are zero and add nothing),
    so runs with different bin counts stack side by side."""
    if metric == "ece":  # bin one-hot times (correct - confidence): Σ_i per bin = n_b (acc_b - conf_b)
        f = np.zeros((run.n, max(width or 0, run.ece_bins)))
        f[np.arange(run.n), bin_index(run.confidence, run.ece_bins)] = run.correct - run.confidence
        return f
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return getattr(run, "correct" if metric == "top1" else metric).astype(np.float64)[:, None]


def stack(runs: Sequence[PerImage], metric: str) -> np.ndarray:
    """Features of several runs on the same images, shape (N, n_runs, k)."""
    if len({r.n for r in runs}) != 1:
        raise ValueError(f"runs differ in their number of test images: {sorted({r.n for r in runs})}")
    width = max(r.ece_bins for r in runs)
    return np.stack([features(r, metric, width) for r in runs], axis=1)


def evaluate(metric: str, feats: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Metric of every run under every weight vector: (R, N) x (N, n_runs, k) -> (R, n_runs).

    ECE = Σ_b (n_b/N)|acc_b - conf_b| = Σ_b |Σ_{i in b} w_i (correct_i - conf_i)| / Σ_i w_i.
    Float32 weights give a float32 product (fast bootstrap); integer weights give float64.
    """
    w = np.atleast_2d(weights)
    f = feats.astype(np.result_type(w.dtype, np.float32), copy=False)
    n, runs, k = f.shape
    sums = (w.astype(f.dtype, copy=False) @ f.reshape(n, runs * k)).reshape(len(w), runs, k)
    per_run = np.abs(sums).sum(-1) if metric == "ece" else sums[..., 0]
    return per_run / w.sum(1, dtype=np.float64)[:, None]


def metric_values(metric: str, run: PerImage, weights: np.ndarray) -> np.ndarray:
    """The metric of one run under each row of weights (R, N) of image multiplicities: (R,)."""
    return evaluate(metric, stack([run], metric), weights)[:, 0]


def metric_value(metric: str, run: PerImage) -> float:
    """The plain metric of one run (every test image once)."""
    return float(metric_values(metric, run, np.ones((1, run.n)))[0])


def image_weights(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """(reps, n) float32 multiplicities of n images resampled with replacement."""
    dtype = np.int32 if reps * n < 2**31 else np.int64
    idx = rng.integers(0, n, size=(reps, n), dtype=dtype) + (np.arange(reps, dtype=dtype) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=reps * n).reshape(reps, n).astype(np.float32)


def bootstrap_indices(n: int, size: int, seed: int = 0, block: int | None = None) -> Iterator[torch.Tensor]:
    """The resamples of ``bootstrap_replicates``: blocks of rows of ``size`` indices drawn
    uniformly with replacement from range(size), ``n`` rows in all, from a CPU generator
    seeded with ``seed`` (so every call yields the same rows)."""
    g = torch.Generator().manual_seed(seed)
    block = block or max(1, min(n, 2_000_000 // max(size, 1)))
    done = 0
    while done < n:
        b = min(block, n - done)
        yield torch.randint(0, size, (b, size), generator=g)
        done += b


def _counts(idx: torch.Tensor, size: int) -> np.ndarray:
    """(rows, size) int64 multiplicities of the index rows ``idx`` (rows, size)."""
    rows = len(idx)
    flat = (idx + torch.arange(rows)[:, None] * size).reshape(-1)
    return torch.bincount(flat, minlength=rows * size).reshape(rows, size).numpy()


def bootstrap_replicates(logits: torch.Tensor, labels: torch.Tensor, n: int = 1000, seed: int = 0,
                         ece_bins: int = ECE_BINS) -> dict[str, torch.Tensor]:
    """top1, NLL and ECE (over ``ece_bins`` bins) on each of the ``n`` resamples of
    ``bootstrap_indices``: float64 tensors (n,)."""
    if n < 1:
        raise ValueError(f"the number of bootstrap resamples must be at least 1, got {n}")
    logits, labels = logits.detach().cpu(), labels.detach().cpu()
    metrics.check(logits, labels)
    run = per_image(logits.double().numpy(), labels.numpy(), ece_bins)
    keys = ("top1", "nll", "ece")
    feats = {k: stack([run], k) for k in keys}
    reps: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for idx in bootstrap_indices(n, run.n, seed):
        w = _counts(idx, run.n)
        for k in keys:
            reps[k].append(evaluate(k, feats[k], w)[:, 0])
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in reps.items()}


def bootstrap_intervals(logits: torch.Tensor, labels: torch.Tensor, n: int = 1000, seed: int = 0,
                        ece_bins: int = ECE_BINS, level: float = 0.95) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals (Efron & Tibshirani, 1993) for top-1, NLL and ECE.

    Draws ``n`` resamples of the N samples with replacement (``bootstrap_indices``: seeded,
    so the result is reproducible), recomputes each metric on every resample
    (``bootstrap_replicates``) and returns, per metric, ``{"value": the metric on all
    samples, "low": q_{(1-level)/2}, "high": q_{(1+level)/2}}``, q being the empirical
    quantiles of the n replicates (linear interpolation).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = bootstrap_replicates(logits, labels, n, seed, ece_bins)
    logits, labels = logits.detach().cpu(), labels.detach().cpu()
    point = {"top1": metrics.top1(logits, labels), "nll": metrics.nll(logits, labels),
             "ece": metrics.calibration_errors(logits, labels, ece_bins)["ece"]}
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out: dict[str, dict[str, float]] = {}
    for key, values in reps.items():
        lo, hi = torch.quantile(values, q).tolist()
        out[key] = {"value": point[key], "low": lo, "high": hi}
    return out
