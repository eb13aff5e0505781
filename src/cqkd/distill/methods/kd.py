"""Knowledge distillation on logits (Hinton et al., 2015), the cross-quality form (Čuk et al., 2023)."""

from __future__ import annotations

import torch

from cqkd.distill.loss import distillation_loss
from cqkd.distill.methods.base import Method, Outputs, Progress, kl_soft


class KD(Method):
    """L = (1 - α)·CE(z_s, y) + α·T²·KL( softmax(z_t / (T_cal·T)) ‖ softmax(z_s / T) ).

    T and α are the run's ``--temperature`` and ``--alpha``. Without ``standardize`` this is
    exactly ``cqkd.distill.loss.distillation_loss`` (the same operations in the same order:
    bit-identical to the runs made before methods existed). With ``standardize=true``
    (Sun et al., CVPR 2024), both logit vectors are z-scored per sample first and T is the
    paper's *base* temperature.
    """

    name = "kd"
    paper = "Hinton et al., 2015 (arXiv:1503.02531)"
    summary = "Hinton's KD: (1-alpha)*CE + alpha*T^2*KL; T, alpha from --temperature, --alpha"
    options = {}

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        s = self.settings
        if not self.opts["standardize"]:
            return distillation_loss(student.logits, teacher.logits, labels, s.temperature, s.alpha, teacher.t_cal,
                                     s.label_smoothing)
        z_s, z_t = self.logits(student, teacher)
        ce = self.ce(student, labels)
        kl = kl_soft(z_s, z_t, s.temperature)
        return {"loss": (1 - s.alpha) * ce + s.alpha * s.temperature**2 * kl, "ce": ce, "kl": kl}
