"""Corruptions for evaluation under shift: ImageNet-C-style jpeg, gaussian_noise, gaussian_blur,
pixelate and contrast at severities 1-5, applied to full-resolution float batches in [0, 1].

The constants and how they are adapted to small images are in docs/quality.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cqkd.errors import CqkdError
from cqkd.views.degrade import _gaussian_blur, jpeg

SEVERITIES = (1, 2, 3, 4, 5)
SHIFT_SEED = 7_919  # corruption noise: a fixed seed, so the same run gives the same shift.csv
BLUR_REFERENCE = 32  # the blur sigmas below are CIFAR-10-C's, for 32 px images; scaled by size / 32

# Hendrycks & Dietterich (ICLR 2019), ImageNet-C: severity 1..5
PARAMS: dict[str, tuple[float, ...]] = {
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality (ImageNet-C)
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # sigma in [0, 1] units (ImageNet-C)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in px at 32 px (CIFAR-10-C), x size / 32
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # box-downsample to this fraction, nearest back (ImageNet-C)
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # (x - mean) * c + mean (ImageNet-C)
}
CORRUPTIONS = tuple(PARAMS)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity (1-5)."""

    name: str
    severity: int

    def __post_init__(self) -> None:
        if self.name not in PARAMS:
            raise CqkdError(f"unknown corruption {self.name!r} (valid: {', '.join(CORRUPTIONS)})")
        if isinstance(self.severity, bool) or not isinstance(self.severity, int) or self.severity not in SEVERITIES:
            raise CqkdError(f"corruption {self.name}: severity {self.severity!r} out of range (1-5)")

    @property
    def parameter(self) -> float:
        """The corruption's parameter at this severity (quality, sigma, fraction or contrast factor)."""
        return PARAMS[self.name][self.severity - 1]

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Corrupt a float batch in [0, 1] (N, C, H, W); noise is drawn from ``generator`` (CPU)."""
        c = self.parameter
        size = x.shape[-1]
        if self.name == "jpeg":
            return jpeg(x, int(c))
        if self.name == "gaussian_noise":
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            return (x + c * noise).clamp_(0, 1)
        if self.name == "gaussian_blur":
            return _gaussian_blur(x, c * size / BLUR_REFERENCE).clamp_(0, 1)
        if self.name == "pixelate":
            h, w = x.shape[-2:]
            small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
            return F.interpolate(small, size=(h, w), mode="nearest")
        mean = x.mean(dim=(-2, -1), keepdim=True)  # contrast: per image and channel, as ImageNet-C
        return ((x - mean) * c + mean).clamp_(0, 1)


def default_grid() -> list[Corruption]:
    """Every corruption at every severity (25 entries)."""
    return [Corruption(name, s) for name in CORRUPTIONS for s in SEVERITIES]


def parse_grid(data: object, where: str) -> list[Corruption]:
    """A grid from a mapping ``{corruption: [severities]}`` (a ``--shift`` file), checked."""
    if not isinstance(data, Mapping) or not data:
        raise CqkdError(f"{where}: expected a mapping of corruption names to lists of severities (1-5)")
    grid = []
    for name, severities in data.items():
        if name not in PARAMS:
            raise CqkdError(f"{where}: unknown corruption {name!r} (valid: {', '.join(CORRUPTIONS)})")
        if isinstance(severities, int) and not isinstance(severities, bool):
            severities = [severities]
        if not isinstance(severities, Sequence) or isinstance(severities, str) or not severities:
            raise CqkdError(f"{where}: {name}: expected a list of severities (1-5), got {severities!r}")
        for s in severities:
            grid.append(Corruption(str(name), s))  # type: ignore[arg-type]
    return grid


def batch_generator(corruption: Corruption, batch: int) -> torch.Generator:
    """The fixed CPU generator of one corruption, severity and batch index."""
    index = CORRUPTIONS.index(corruption.name)
    return torch.Generator().manual_seed(SHIFT_SEED + 1_000_003 * index + 10_007 * corruption.severity + batch)
