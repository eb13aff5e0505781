"""Classification and calibration metrics as pure functions of (logits, labels).

Conventions: logits (N, K) float, labels (N,) int64; probabilities p = softmax(logits);
confidence = max_k p_k; prediction = argmax_k p_k. Entropy and NLL are in nats. Calibration
errors use equal-width confidence bins (15 by default, Guo et al., 2017) unless stated.

Bin edges: with M bins and edges e_b = b/M, bin b holds the confidences in [e_b, e_{b+1})
for b < M-1 and the last bin holds [e_{M-1}, 1], closed on the right. This is the convention
of torchmetrics' ``multiclass_calibration_error`` (``bucketize(right=True) - 1``), so ECE, MCE
and RMSCE agree with it, except for a confidence of exactly 1.0: torchmetrics counts that
in a hidden extra bin of its own (torchmetrics issue #3510), here it belongs to the last
bin as in Guo et al. (2017). All computations run in float64. Bootstrap intervals of these
metrics: ``cqkd.calibration.bootstrap``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.double(), dim=-1)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose argmax is the label."""
    return float((logits.argmax(-1) == labels).double().mean())


def topk(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Fraction of samples whose label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).double().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Negative log-likelihood  −(1/N) Σ_i log p_{i,y_i}  (nats)."""
    return float(F.cross_entropy(logits.double(), labels))


def brier(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Brier score  (1/N) Σ_i Σ_k (p_ik − 1[y_i = k])²  (Brier, 1950), in [0, 2]."""
    p = _probs(logits)
    onehot = F.one_hot(labels, p.shape[-1]).double()
    return float(((p - onehot) ** 2).sum(-1).mean())


def entropy(logits: torch.Tensor) -> float:
    """Mean predictive entropy  −(1/N) Σ_i Σ_k p_ik log p_ik  (nats)."""
    logp = F.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def confidence(logits: torch.Tensor) -> float:
    """Mean top-1 confidence  (1/N) Σ_i max_k p_ik."""
    return float(_probs(logits).max(-1).values.mean())


def check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """ValueError unless logits are (N, K) and labels (N,) with N >= 1."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples: metrics need at least one prediction")


def bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The equal-width bin of each confidence: b such that conf in [b/M, (b+1)/M), the last bin
    closed at 1 (see the module docstring)."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf.double().contiguous(), edges, right=True) - 1  # [e_b, e_{b+1}) -> b
    return idx.clamp_(0, n_bins - 1)


def _bin_stats(conf: torch.Tensor, correct: torch.Tensor, n_bins: int):
    """Per equal-width bin: (count, mean confidence, accuracy); empty bins give 0, 0."""
    conf = conf.double()
    idx = bin_index(conf, n_bins)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=n_bins)
    safe = count.clamp(min=1)
    return count, conf_sum / safe, acc_sum / safe


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """The data of a reliability diagram: bin edges, counts, mean confidence, accuracy
    (empty bins have count 0 and confidence = accuracy = 0)."""
    check(logits, labels)
    p = _probs(logits)
    conf, pred = p.max(-1)
    count, mean_conf, acc = _bin_stats(conf, pred == labels, n_bins)
    return {"edges": torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist(), "count": count.tolist(),
            "confidence": mean_conf.tolist(), "accuracy": acc.tolist()}


def calibration_errors(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Top-1 calibration errors over equal-width bins B_b (Naeini et al., 2015; Guo et al., 2017).

    ECE = Σ_b (|B_b|/N) · |acc(B_b) − conf(B_b)|;  MCE = max_b |acc(B_b) − conf(B_b)|;
    RMSCE = sqrt(Σ_b (|B_b|/N) · (acc(B_b) − conf(B_b))²).
    ``ece_over`` sums the bins where conf > acc (over-confidence), ``ece_under`` the others,
    so ece = ece_over + ece_under. Empty bins are skipped (also by MCE).
    """
    check(logits, labels)
    p = _probs(logits)
    conf, pred = p.max(-1)
    count, mean_conf, acc = _bin_stats(conf, pred == labels, n_bins)
    w = count / count.sum()
    gap = mean_conf - acc
    occupied = count > 0
    return {
        "ece": float((w * gap.abs()).sum()),
        "mce": float(gap.abs()[occupied].max()) if occupied.any() else 0.0,
        "rmsce": float(math.sqrt(float((w * gap**2).sum()))),
        "ece_over": float((w * gap.clamp(min=0)).sum()),
        "ece_under": float((w * (-gap).clamp(min=0)).sum()),
    }


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of ``logits`` against ``labels`` over ``n_bins`` equal-width confidence bins."""
    return calibration_errors(logits, labels, n_bins)["ece"]


def adaptive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE over equal-mass bins: samples sorted by confidence, split into n_bins groups of
    (nearly) equal size (Nixon et al., 2019); ties in confidence are broken by sample order.

    With fewer samples than bins, each sample is its own bin."""
    check(logits, labels)
    p = _probs(logits)
    conf, pred = p.max(-1)
    order = conf.argsort(stable=True)
    correct = (pred == labels).double()[order]
    conf = conf[order]
    n = len(conf)
    total = 0.0
    for chunk_c, chunk_a in zip(conf.tensor_split(n_bins), correct.tensor_split(n_bins)):
        if len(chunk_c):
            total += len(chunk_c) / n * abs(float(chunk_c.mean() - chunk_a.mean()))
    return total


def classwise_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al., 2019): the mean over classes k of the ECE of p_k against
    1[y = k], with equal-width bins on p_k:

        cwECE = (1/K) Σ_k Σ_b (|B_kb|/N) · |mean_{i∈B_kb} p_ik − mean_{i∈B_kb} 1[y_i = k]|
    """
    check(logits, labels)
    p = _probs(logits)
    k = p.shape[-1]
    total = 0.0
    for c in range(k):
        count, mean_p, freq = _bin_stats(p[:, c], labels == c, n_bins)
        total += float(((count / count.sum()) * (mean_p - freq).abs()).sum())
    return total / k


def all_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Every metric cqkd reports for a set of predictions."""
    logits, labels = logits.detach().cpu(), labels.detach().cpu()
    check(logits, labels)
    out = {"top1": top1(logits, labels)}
    if logits.shape[-1] > 10:
        out["top5"] = topk(logits, labels, 5)
    out.update(nll=nll(logits, labels), brier=brier(logits, labels))
    out.update(calibration_errors(logits, labels, n_bins))
    out.update(adaptive_ece=adaptive_ece(logits, labels, n_bins),
               classwise_ece=classwise_ece(logits, labels, n_bins),
               entropy=entropy(logits), confidence=confidence(logits),
               n=int(len(labels)), ece_bins=n_bins)
    return out


def mean_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean KL(p_teacher ‖ p_student) over samples, in nats (both at temperature 1)."""
    log_t = F.log_softmax(teacher_logits.double(), -1)
    log_s = F.log_softmax(student_logits.double(), -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())
