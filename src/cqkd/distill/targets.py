"""Top-k teacher targets: the k largest logits kept, the other classes share the remaining mass.

``topk_encode(z, k)`` keeps the k largest logits and one *rest* logit
``r = logsumexp(z_rest) - log(C - k)``; ``topk_decode`` gives every other class the logit ``r``.
Then ``softmax(z_hat)`` equals ``softmax(z)`` exactly on the kept classes, and the other classes
share the remaining mass ``1 - sum(kept)`` equally (see docs/performance.md).
"""

from __future__ import annotations

import math

import torch

KL_TEMPERATURES = (1.0, 4.0, 10.0, 20.0)  # where the approximation's KL is measured and reported


def topk_encode(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (n, k) int64, values (n, k + 1)): the k largest logits of each row, then the rest logit."""
    z = z.float()
    values, index = z.topk(k, dim=1)
    num_classes = z.shape[1]
    if k >= num_classes:
        rest = torch.full((len(z), 1), -math.inf, device=z.device)
    else:
        others = z.scatter(1, index, -math.inf)
        rest = (others.logsumexp(1) - math.log(num_classes - k)).unsqueeze(1)
    return index, torch.cat([values, rest], dim=1)


def topk_decode(index: torch.Tensor, values: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (n, C): ``values[:, :k]`` at ``index``, the rest logit everywhere else."""
    values = values.float()
    out = values[:, -1:].expand(len(values), num_classes).clone()
    return out.scatter_(1, index.long(), values[:, :-1])


def topk_logits(z: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k approximation of logits ``z`` (what a top-k cache stores, decoded)."""
    return topk_decode(*topk_encode(z, k), z.shape[1])


def kl_to_full(z: torch.Tensor, z_hat: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per row KL( softmax(z/T) || softmax(z_hat/T) ) in nats."""
    p = torch.log_softmax(z.double() / temperature, dim=1)
    q = torch.log_softmax(z_hat.double() / temperature, dim=1)
    return (p.exp() * (p - q)).sum(1).clamp_min(0)
