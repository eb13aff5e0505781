"""Golden values for cqkd.metrics on hand-made cases, and agreement with torchmetrics.

The hand-made cases use two classes and logits log(p), so softmax gives the probabilities
exactly (to rounding) and every number below can be checked with a pocket calculator.
Confidences are chosen away from the bin edges b/15.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
)

from cqkd.calibration import metrics as M


def two_class(confs: list[float], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is [c, 1 - c] (prediction: class 0 with confidence c > 0.5)."""
    p = torch.tensor([[c, 1 - c] for c in confs], dtype=torch.float64)
    return p.log(), torch.tensor(labels)


# --- perfectly calibrated: 4 samples at confidence 0.75, 3 of them correct -----------------
# acc = conf = 0.75 in the one occupied bin ([0.7333, 0.8)) -> ECE = MCE = RMSCE = 0.
# NLL     = -(3 ln 0.75 + ln 0.25)/4 = (3·0.2876821 + 1.3862944)/4            = 0.5623351
# Brier   = correct: 0.25² + 0.25² = 0.125; wrong: 0.75² + 0.75² = 1.125
#           (3·0.125 + 1.125)/4                                                = 0.375
# entropy = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.2157616 + 0.3465736            = 0.5623351
# classwise: p_0 = 0.75 vs freq(y=0) = 3/4, p_1 = 0.25 vs freq(y=1) = 1/4      -> 0
# adaptive, 2 bins (ties kept in sample order): {0,1} acc 1, {2,3} acc 0.5
#           0.5·|0.75-1| + 0.5·|0.75-0.5|                                      = 0.25
CALIBRATED = dict(confs=[0.75] * 4, labels=[0, 0, 0, 1],
                  top1=0.75, nll=0.5623351, brier=0.375, entropy=0.5623351, confidence=0.75,
                  ece=0.0, mce=0.0, rmsce=0.0, ece_over=0.0, ece_under=0.0, classwise_ece=0.0, adaptive2=0.25)

# --- over-confident: 4 samples at confidence 0.9, 2 correct -----------------------------------
# one bin ([0.8667, 0.9333)): gap = 0.9 - 0.5 = 0.4 -> ECE = MCE = RMSCE = ece_over = 0.4
# NLL     = -(2 ln 0.9 + 2 ln 0.1)/4 = (0.1053605 + 2.3025851)/2               = 1.2039728
# Brier   = correct: 0.1² + 0.1² = 0.02; wrong: 0.9² + 0.9² = 1.62 -> mean     = 0.82
# entropy = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.0948245 + 0.2302585                 = 0.3250830
# classwise: |0.9 - 0.5| for class 0 and |0.1 - 0.5| for class 1 -> mean       = 0.4
# adaptive, 2 bins: {0,1} (labels 0,0) acc 1 -> 0.1; {2,3} acc 0 -> 0.9 -> 0.5·0.1 + 0.5·0.9 = 0.5
OVERCONFIDENT = dict(confs=[0.9] * 4, labels=[0, 0, 1, 1],
                     top1=0.5, nll=1.2039728, brier=0.82, entropy=0.3250830, confidence=0.9,
                     ece=0.4, mce=0.4, rmsce=0.4, ece_over=0.4, ece_under=0.0, classwise_ece=0.4, adaptive2=0.5)

# --- under-confident: all 4 correct, 2 at confidence 0.55, 2 at 0.7 ---------------------------
# bins [0.5333, 0.6): gap 0.55 - 1 = -0.45;  [0.6667, 0.7333): gap 0.7 - 1 = -0.3
# ECE   = 0.5·0.45 + 0.5·0.3 = 0.375 (all under-confident);  MCE = 0.45
# RMSCE = sqrt(0.5·0.2025 + 0.5·0.09) = sqrt(0.14625)                          = 0.3824265
# NLL     = -(ln 0.55 + ln 0.7)/2 = (0.5978370 + 0.3566749)/2                  = 0.4772560
# Brier   = (2·0.45² + 2·0.3²)/2 = (0.405 + 0.18)/2                            = 0.2925
# entropy = (H(0.55) + H(0.7))/2 = (0.6881388 + 0.6108643)/2                   = 0.6495016
# classwise: class 0 as ECE (0.375); class 1: p_1 = 0.45, 0.3 never the label -> 0.375
# adaptive, 2 bins: {0.55, 0.55} and {0.7, 0.7}: same as ECE                   = 0.375
UNDERCONFIDENT = dict(confs=[0.55, 0.7, 0.55, 0.7], labels=[0, 0, 0, 0],
                      top1=1.0, nll=0.4772560, brier=0.2925, entropy=0.6495016, confidence=0.625,
                      ece=0.375, mce=0.45, rmsce=0.3824265, ece_over=0.0, ece_under=0.375,
                      classwise_ece=0.375, adaptive2=0.375)

# --- mixed: 2 over-confident (0.9, one correct) and 2 under-confident (0.55, both correct) -----
# ECE = 0.5·0.4 + 0.5·0.45 = 0.425 = ece_over 0.2 + ece_under 0.225;  MCE = 0.45
# RMSCE = sqrt(0.5·0.16 + 0.5·0.2025) = sqrt(0.18125)                          = 0.4257347
# NLL = -(ln 0.9 + ln 0.1 + 2 ln 0.55)/4 = (0.1053605 + 2.3025851 + 1.1956740)/4 = 0.9009049
# Brier = (0.02 + 1.62 + 2·0.405)/4 = 2.45/4                                   = 0.6125
# entropy = (2·H(0.9) + 2·H(0.55))/4 = (0.3250830 + 0.6881388)/2              = 0.5066109
# classwise: class 0 bins 0.9 (freq 0.5, gap 0.4) and 0.55 (freq 1, gap 0.45) -> 0.425;
#            class 1 bins 0.1 (freq 0.5, gap 0.4) and 0.45 (freq 0, gap 0.45) -> 0.425
# adaptive, 2 bins: sorted by confidence {0.55, 0.55} gap 0.45, {0.9, 0.9} gap 0.4 -> 0.425
MIXED = dict(confs=[0.9, 0.9, 0.55, 0.55], labels=[0, 1, 0, 0],
             top1=0.75, nll=0.9009049, brier=0.6125, entropy=0.5066109, confidence=0.725,
             ece=0.425, mce=0.45, rmsce=0.4257347, ece_over=0.2, ece_under=0.225,
             classwise_ece=0.425, adaptive2=0.425)

CASES = {"calibrated": CALIBRATED, "overconfident": OVERCONFIDENT, "underconfident": UNDERCONFIDENT, "mixed": MIXED}


@pytest.mark.parametrize("name", list(CASES))
def test_golden_values(name: str) -> None:
    case = CASES[name]
    logits, labels = two_class(case["confs"], case["labels"])
    m = M.all_metrics(logits, labels, n_bins=15)
    for key in ("top1", "nll", "brier", "entropy", "confidence", "ece", "mce", "rmsce", "ece_over",
                "ece_under", "classwise_ece"):
        assert m[key] == pytest.approx(case[key], abs=1e-6), key
    assert M.adaptive_ece(logits, labels, n_bins=2) == pytest.approx(case["adaptive2"], abs=1e-6)
    assert m["ece_over"] + m["ece_under"] == pytest.approx(m["ece"], abs=1e-12)
    assert m["n"] == 4 and m["ece_bins"] == 15 and "top5" not in m


def test_topk_golden() -> None:
    # 3 samples, 4 classes; the label ranks 1st, 3rd and 4th by logit
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2, 3])
    assert M.top1(logits, labels) == pytest.approx(1 / 3)
    assert M.topk(logits, labels, 2) == pytest.approx(1 / 3)
    assert M.topk(logits, labels, 3) == pytest.approx(2 / 3)
    assert M.topk(logits, labels, 5) == pytest.approx(1.0)  # k is capped at K


def test_uniform_prediction_entropy_and_brier() -> None:
    # K equal logits: p = 1/K, entropy = ln K, NLL = ln K, Brier = (1 - 1/K)² + (K-1)/K² = 1 - 1/K
    k = 7
    logits, labels = torch.zeros(5, k), torch.tensor([0, 1, 2, 3, 4])
    assert M.entropy(logits) == pytest.approx(math.log(k))
    assert M.nll(logits, labels) == pytest.approx(math.log(k))
    assert M.brier(logits, labels) == pytest.approx(1 - 1 / k)
    assert M.confidence(logits) == pytest.approx(1 / k)


def test_bin_edges_follow_torchmetrics_left_closed_bins() -> None:
    # confidence exactly 0.5 with 2 bins: bins are [0, 0.5) and [0.5, 1], so it falls in the second
    logits, labels = torch.zeros(3, 2), torch.tensor([0, 1, 0])
    assert M.reliability_bins(logits, labels, n_bins=2)["count"] == [0.0, 3.0]
    assert M.reliability_bins(logits, labels, n_bins=4)["count"] == [0.0, 0.0, 3.0, 0.0]
    ours = M.calibration_errors(logits, labels, n_bins=2)["ece"]
    theirs = float(multiclass_calibration_error(torch.full((3, 2), 0.5), labels, 2, n_bins=2, norm="l1"))
    assert ours == pytest.approx(theirs, abs=1e-7)  # |0.5 - 2/3| = 1/6
    assert ours == pytest.approx(1 / 6)


def test_confidence_one_is_in_the_last_bin() -> None:
    # conf 0.95 (correct) and exactly 1.0 (wrong, exp(-100) vanishes in float64): both in the
    # last bin [14/15, 1]: |0.975 - 0.5| = 0.475. torchmetrics would count 1.0 in a hidden 16th
    # bin (issue #3510) and give 0.5·0.05 + 0.5·1.0 = 0.525; we follow Guo et al.
    logits = torch.tensor([[math.log(0.95), math.log(0.05)], [100.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    bins = M.reliability_bins(logits, labels, 15)
    assert bins["count"][-1] == 2.0 and sum(bins["count"]) == 2.0
    assert M.ece(logits, labels) == pytest.approx(0.475, abs=1e-9)


@pytest.mark.parametrize("k,scale,seed", [(3, 1.0, 0), (10, 3.0, 1), (10, 0.3, 2), (100, 5.0, 3)])
def test_agrees_with_torchmetrics_on_random_logits(k: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3000, k, generator=g) * scale
    labels = torch.randint(0, k, (3000,), generator=g)
    probs = torch.softmax(logits.double(), -1)  # probabilities, so torchmetrics does not guess
    ours = M.calibration_errors(logits, labels, 15)
    for key, norm in (("ece", "l1"), ("mce", "max"), ("rmsce", "l2")):
        theirs = float(multiclass_calibration_error(probs, labels, k, n_bins=15, norm=norm))
        assert ours[key] == pytest.approx(theirs, abs=1e-6), key
    assert M.top1(logits, labels) == pytest.approx(
        float(multiclass_accuracy(logits, labels, k, average="micro")), abs=1e-6)
    if k >= 5:
        assert M.topk(logits, labels, 5) == pytest.approx(
            float(multiclass_accuracy(logits, labels, k, average="micro", top_k=5)), abs=1e-6)
    assert M.nll(logits, labels) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), abs=1e-5)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        M.calibration_errors(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        M.all_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
