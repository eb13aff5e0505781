"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cqkd.distill.methods.base import Method, Needs, Option, Outputs, Progress


class DIST(Method):
    """L = CE(z_s, y) + β·τ²·(1 - mean_i ρ(p_i^S, p_i^T)) + γ·τ²·(1 - mean_c ρ(p_:c^S, p_:c^T)).

    p = softmax(z/τ); ρ is the Pearson correlation: over the classes of one sample (the
    inter-class relation) and over the batch for one class (the intra-class relation).
    Defaults β = γ = τ = 1: the authors' code and their ImageNet setting (the paper's CIFAR-100
    runs use β = γ = 2, τ = 4; pass ``dist,beta=2,gamma=2,tau=4``). The intra-class term
    correlates whole columns of the batch: it needs every class's probability (no --teacher-topk).
    """

    name = "dist"
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"
    summary = "inter- and intra-class Pearson relations of the probabilities"
    options = {
        "beta": Option(1.0, "weight of the inter-class relation", low=0.0),
        "gamma": Option(1.0, "weight of the intra-class relation", low=0.0),
        "tau": Option(1.0, "temperature", low=0.0, open_low=True),
    }
    needs = Needs(full_distribution=True)

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        z_s, z_t = self.logits(student, teacher)
        inter, intra = dist_terms(z_s, z_t, self.opts["tau"])
        ce = self.ce(student, labels)
        loss = ce + self.opts["beta"] * inter + self.opts["gamma"] * intra
        return {"loss": loss, "ce": ce, "inter": inter, "intra": intra}


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine similarity of the centred rows.

    ``F.cosine_similarity`` (as torchdistill's DISTLoss): the product of the norms is clamped at
    ``eps``; the authors' code adds ``eps`` to it instead, which differs only for near-constant
    rows (norm product below ~1e-8)."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1, eps=eps)


def dist_terms(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra): τ²·(1 - mean Pearson) over samples' rows and over classes' columns."""
    p_s, p_t = (z_s / tau).softmax(1), (z_t / tau).softmax(1)
    inter = tau**2 * (1 - pearson(p_s, p_t).mean())
    intra = tau**2 * (1 - pearson(p_s.t(), p_t.t()).mean())
    return inter, intra
