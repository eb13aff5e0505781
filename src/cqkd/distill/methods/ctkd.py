"""CTKD: curriculum temperature for knowledge distillation (Li et al., AAAI 2023)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cqkd.distill.methods.base import Method, Option, Outputs, Progress, kl_soft

PAPER_EPOCHS = 240  # the paper's CIFAR-100 schedule, over which λ ramps up in 10 epochs


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -λ backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # noqa: D102
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return -ctx.lam * grad, None


class GlobalTemperature(nn.Module):
    """A learned global temperature T = t_start + t_range·sigmoid(θ), θ initialised at 1."""

    def __init__(self, t_start: float, t_range: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(1))
        self.t_start, self.t_range = t_start, t_range

    def forward(self, lam: float) -> torch.Tensor:
        """T, with the gradient that reaches θ reversed and scaled by λ."""
        return self.t_start + self.t_range * torch.sigmoid(_ReverseGrad.apply(self.theta, lam))


class CTKD(Method):
    """L = (1 - α)·CE + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) with T learned adversarially.

    T = t_start + t_range·sigmoid(θ) (the authors' global temperature: θ₀ = 1, t_start = 1,
    t_range = 20, so T₀ ≈ 15.6). θ receives the *reversed* gradient (-λ·∂L/∂θ): the student
    minimises the KD loss, the temperature maximises it. λ follows the paper's curriculum,
    a cosine ramp from 0 to ``lambda_max`` = 1 over the first 10 of 240 epochs; ``ramp=0``
    (default) scales it to the run: epochs·10/240 (the authors' code: models/temp_global.py,
    CosineDecay and scripts/run_cifar_distill.sh of zhengli97/CTKD). α is the run's ``--alpha``,
    so that ctkd differs from kd only in the temperature (the authors' CIFAR script weighs
    0.1·CE + 0.9·KD: ``--alpha 0.9``). The learned T is logged each epoch as ``train/temperature``.
    """

    name = "ctkd"
    paper = "Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023"
    summary = "KD with a learned global temperature (gradient reversal, cosine lambda curriculum)"
    options = {
        "t_start": Option(1.0, "the smallest temperature", low=0.0, open_low=True),
        "t_range": Option(20.0, "T = t_start + t_range*sigmoid(theta)", low=0.0),
        "lambda_max": Option(1.0, "the final weight of the reversed gradient", low=0.0),
        "ramp": Option(0.0, "epochs of the cosine ramp of lambda (0: epochs*10/240)", low=0.0),
    }

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> nn.ModuleDict:
        """The learned temperature."""
        self.temperature = GlobalTemperature(self.opts["t_start"], self.opts["t_range"])
        return nn.ModuleDict({"temperature": self.temperature})

    def lam(self, epoch: float) -> float:
        """λ(e) = λ_max·(1 - cos(π·min(e/ramp, 1)))/2."""
        ramp = self.opts["ramp"] or self.settings.epochs * 10 / PAPER_EPOCHS
        return self.opts["lambda_max"] * (1 - math.cos(math.pi * min(epoch / ramp, 1.0))) / 2

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        z_s, z_t = self.logits(student, teacher)
        t = self.temperature(self.lam(progress.epoch))
        ce = self.ce(student, labels)
        kl = kl_soft(z_s, z_t, t)
        alpha = self.settings.alpha
        loss = (1 - alpha) * ce + alpha * t.squeeze() ** 2 * kl
        return {"loss": loss, "ce": ce, "kl": kl, "temperature": t.detach().squeeze()}
