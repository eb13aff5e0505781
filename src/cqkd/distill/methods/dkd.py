"""Decoupled knowledge distillation (Zhao et al., CVPR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cqkd.distill.methods.base import Method, Needs, Option, Outputs, Progress

PAPER_EPOCHS = 240  # the paper's CIFAR-100 schedule, over which its 20-epoch warm-up is defined


class DKD(Method):
    """L = CE(z_s, y) + w(e)·(α·TCKD + β·NCKD), with T = 4 (the paper's CIFAR-100 defaults α=1, β=8).

    With p = softmax(z/T) and t the target class:
    b = (p_t, 1 - p_t) the binary target/non-target probabilities, p̂ = softmax of the
    non-target logits only (the target logit masked out);
    TCKD = T²·KL(b^T ‖ b^S), NCKD = T²·KL(p̂^T ‖ p̂^S), each a batch mean (as in mdistiller).
    w(e) = min(e / warmup, 1) is the linear warm-up over the epoch e (fractional within an
    epoch). The paper warms up over 20 of 240 epochs; ``warmup=0`` (the default) scales that
    to the run: warmup = epochs · 20/240. NCKD needs every class's probability: no --teacher-topk.
    """

    name = "dkd"
    paper = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"
    summary = "alpha*TCKD + beta*NCKD (target / non-target KD), linear warm-up"
    options = {
        "alpha": Option(1.0, "weight of the target-class term TCKD", low=0.0),
        "beta": Option(8.0, "weight of the non-target term NCKD", low=0.0),
        "T": Option(4.0, "temperature", low=0.0, open_low=True),
        "warmup": Option(0.0, "linear warm-up in epochs (0: epochs*20/240, the paper's ratio)", low=0.0),
    }
    needs = Needs(full_distribution=True)

    def warmup_epochs(self) -> float:
        """The warm-up length in epochs for this run."""
        return self.opts["warmup"] or self.settings.epochs * 20 / PAPER_EPOCHS

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        z_s, z_t = self.logits(student, teacher)
        tckd, nckd = dkd_terms(z_s, z_t, labels, self.opts["T"])
        ce = self.ce(student, labels)
        w = min(progress.epoch / self.warmup_epochs(), 1.0)
        loss = ce + w * (self.opts["alpha"] * tckd + self.opts["beta"] * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}


def dkd_terms(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each T²·KL averaged over the batch (see ``DKD``)."""
    target = F.one_hot(labels, z_s.shape[-1]).bool()
    p_s, p_t = F.softmax(z_s / temperature, -1), F.softmax(z_t / temperature, -1)
    b_s = torch.stack([(p_s * target).sum(-1), (p_s * ~target).sum(-1)], -1)
    b_t = torch.stack([(p_t * target).sum(-1), (p_t * ~target).sum(-1)], -1)
    tckd = F.kl_div(b_s.clamp_min(1e-12).log(), b_t, reduction="batchmean") * temperature**2
    masked = -1000.0  # as in mdistiller: the target logit pushed far below, so softmax gives it ~0
    log_q_s = F.log_softmax(z_s / temperature + masked * target, -1)
    q_t = F.softmax(z_t / temperature + masked * target, -1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * temperature**2
    return tckd, nckd
