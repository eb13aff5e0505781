"""Teacher-free KD: the manually designed virtual teacher (Yuan et al., CVPR 2020, Tf-KD_reg)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cqkd.distill.methods.base import Method, Needs, Option, Outputs, Progress


class TFKD(Method):
    """L = (1 - α)·CE(z_s, y) + α·m·(1/K)·mean_i KL( softmax(u_i/T) ‖ softmax(z_s,i) ).

    u_i is the virtual teacher's distribution: ``a`` on the true class, (1 - a)/(K - 1) on
    every other. As in the authors' code, it is softened by softmax(u/T) (of the probabilities
    themselves) and the KL is averaged over all N·K elements (``nn.KLDivLoss()``'s mean, hence
    the 1/K and the multiplier m). Defaults: the authors' ResNet-18 / CIFAR-100 setting,
    a = 0.99, T = 20, α = 0.1, m = 100 (yuanli2333/Teacher-free-Knowledge-Distillation:
    my_loss_function.py, experiments/base_experiments/base_resnet18/params.json). No teacher is run in training: the control that asks
    whether a teacher is needed at all (the run's --teacher is only evaluated on test).
    """

    name = "tfkd"
    paper = "Yuan et al., Revisiting Knowledge Distillation via Label Smoothing Regularization, CVPR 2020"
    summary = "teacher-free regulariser: a virtual teacher with probability a on the true class"
    options = {
        "a": Option(0.99, "the virtual teacher's probability of the true class", low=0.0, high=1.0),
        "T": Option(20.0, "temperature applied to the virtual teacher", low=0.0, open_low=True),
        "alpha": Option(0.1, "weight of the regulariser", low=0.0, high=1.0),
        "multiplier": Option(100.0, "scale of the regulariser", low=0.0),
    }
    needs = Needs(teacher_logits=False)
    logit_method = False

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        z_s = student.logits.float()
        reg = tfkd_regulariser(z_s, labels, self.opts["a"], self.opts["T"]) * self.opts["multiplier"]
        ce = self.ce(student, labels)
        alpha = self.opts["alpha"]
        return {"loss": (1 - alpha) * ce + alpha * reg, "ce": ce, "reg": reg}


def tfkd_regulariser(z_s: torch.Tensor, labels: torch.Tensor, a: float, temperature: float) -> torch.Tensor:
    """mean over N·K of KL(softmax(u/T) ‖ softmax(z_s)), u the virtual teacher's probabilities."""
    k = z_s.shape[-1]
    u = torch.full_like(z_s, (1 - a) / (k - 1)).scatter_(1, labels.view(-1, 1), a)
    return F.kl_div(F.log_softmax(z_s, -1), F.softmax(u / temperature, -1), reduction="sum") / z_s.numel()
