"""The cross-quality distillation loss (Hinton et al., 2015; Čuk et al., 2023).

    L = (1 - α) · CE(z_s, y) + α · T² · KL( softmax(z_t / (T_cal · T)) ‖ softmax(z_s / T) )

z_s are the student's logits on the degraded view, z_t the teacher's on the full-resolution
view of the same crop, T the distillation temperature and T_cal the teacher's calibration
temperature (1 for an uncalibrated teacher). The T² factor keeps the gradient magnitude of
the soft term comparable across temperatures: ∂(α·T²·KL)/∂z_s = α·T·(p_s^T − p_t^T) per
sample, with the KL averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_targets(teacher_logits: torch.Tensor, temperature: float, t_cal: float = 1.0) -> torch.Tensor:
    """softmax(z_t / (T_cal · T)): the teacher's distribution the student is trained to match."""
    return F.softmax(teacher_logits.float() / (t_cal * temperature), dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, t_cal: float = 1.0,
                      label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The CQKD loss and its terms by name: ``loss``, ``ce`` (hard labels), ``kl`` (soft targets).

    ``kl`` is the batch mean of KL(p_t^T ‖ p_s^T) in nats, without the T² factor.
    """
    z_s = student_logits.float()
    ce = F.cross_entropy(z_s, labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return {"loss": ce, "ce": ce, "kl": torch.zeros((), device=z_s.device)}
    log_p_t = F.log_softmax(teacher_logits.float() / (t_cal * temperature), dim=-1)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def supervised_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                    label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Cross-entropy on the hard labels (optionally label-smoothed, Szegedy et al. 2016)."""
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    return {"loss": ce, "ce": ce}
