"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cqkd.distill.methods.base import (
    Method,
    Needs,
    Option,
    Outputs,
    Progress,
    match_size,
)


class FitNet(Method):
    """L = CE(z_s, y) + w·MSE( r(h_s), h_t ), h the hint (middle) stage's feature map, w = 100.

    r is the method's own regressor, a 1x1 convolution + BN + ReLU from the student's to the
    teacher's channels (the teacher's stage outputs are post-ReLU). The two maps have different
    sizes when the teacher sees 28 px and the student 7 px: the larger map is average-pooled to
    the smaller (``match_size``). One stage, as mdistiller's FitNet (its hint weight 100, CE
    weight 1), not the paper's two-stage schedule (hint pre-training, then KD).
    """

    name = "fitnet"
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"
    summary = "hint-layer regression (1x1-conv regressor, L2) + CE"
    options = {"weight": Option(100.0, "weight of the hint loss", low=0.0)}
    needs = Needs(teacher_logits=False, features="hint")
    logit_method = False

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> nn.ModuleDict:
        """The regressor from the student's hint channels to the teacher's."""
        c_s, c_t = student_shapes[0][1], teacher_shapes[0][1]
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t), nn.ReLU())
        return nn.ModuleDict({"regressor": self.regressor})

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        h_s, h_t = match_size(self.regressor(student.features[0].float()), teacher.features[0].float())
        hint = F.mse_loss(h_s, h_t)
        ce = self.ce(student, labels)
        return {"loss": ce + self.opts["weight"] * hint, "ce": ce, "hint": hint}
