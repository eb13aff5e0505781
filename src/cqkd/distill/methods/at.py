"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cqkd.distill.methods.base import (
    Method,
    Needs,
    Option,
    Outputs,
    Progress,
    match_size,
)


class AT(Method):
    """L = CE(z_s, y) + β/2 · Σ_j mean( (Q_s^j - Q_t^j)² ), β = 1000, p = 2 (the paper's).

    Q^j = vec(A^j) / ‖vec(A^j)‖₂ with the attention map A^j = mean_c |a_c^j|^p of stage j
    (every stage of the network). When the maps differ in size (a 28 px teacher, a 7 px
    student) the larger attention map A is average-pooled to the smaller before it is
    flattened and normalised (``match_size``): pooling the map of energies keeps it the
    spatial mean of |a|^p over each cell.
    """

    name = "at"
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"
    summary = "attention maps (sum of |a|^p over channels, normalised) at every stage + CE"
    options = {
        "beta": Option(1000.0, "weight of the attention term (the loss takes beta/2)", low=0.0),
        "p": Option(2.0, "exponent of the attention map", low=0.0, open_low=True),
    }
    needs = Needs(teacher_logits=False, features="stages")
    logit_method = False

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        p = self.opts["p"]
        att = sum(at_term(f_s, f_t, p) for f_s, f_t in zip(student.features, teacher.features))
        ce = self.ce(student, labels)
        return {"loss": ce + self.opts["beta"] / 2 * att, "ce": ce, "at": att}


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """A = mean over channels of |a|^p: (N, C, H, W) -> (N, 1, H, W)."""
    return f.float().abs().pow(p).mean(1, keepdim=True)


def at_term(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """mean( (Q_s - Q_t)² ) for one stage, Q the L2-normalised flattened attention map."""
    a_s, a_t = match_size(attention_map(f_s, p), attention_map(f_t, p))
    q_s, q_t = F.normalize(a_s.flatten(1)), F.normalize(a_t.flatten(1))
    return (q_s - q_t).pow(2).mean()
