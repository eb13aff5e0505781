"""Intermediate features of a model by forward hooks, without editing the model.

``feature_stages(model)`` names the modules whose outputs are the model's stages: for the
registered CNNs the last conv block of each stage (before its pooling), for torchvision and
timm ResNets ``layer1`` ... ``layer4``. ``Taps(model, names)`` records those outputs on every
forward pass until ``take()`` hands them over.
"""

from __future__ import annotations

import torch
from torch import nn

from cqkd.errors import CqkdError


def feature_stages(model: nn.Module) -> list[str]:
    """The names of ``model``'s stage modules, in forward order; ``CqkdError`` if it has none we know."""
    ends = getattr(model, "stage_ends", None)  # cqkd's SmallCNN records its stages
    if isinstance(ends, list) and ends:
        return list(ends)
    children = dict(model.named_children())
    layers = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in children]  # torchvision / timm ResNets
    if layers:
        return layers
    raise CqkdError(f"{type(model).__name__} has no feature stages that cqkd knows (cqkd CNNs and ResNets have); "
                    "a feature method cannot use it")


def hint_stage(stages: list[str]) -> str:
    """The middle stage (FitNets' hint layer): stage ``len // 2`` of 3 or 4."""
    return stages[len(stages) // 2]


class Taps:
    """Forward hooks on named submodules that keep their latest outputs (in registration order)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        """The outputs of the last forward pass, in ``names`` order (and forget them)."""
        out = [self.outputs[n] for n in self.names if n in self.outputs]
        self.outputs = {}
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
