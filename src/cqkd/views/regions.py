"""Random-resized crops as explicit regions: a box and a flip bit, drawn from a seed or replayed.

A region of an image of size (H, W) is an int64 row (top, left, height, width, flip). The
``RegionBank`` gives every training image ``k`` regions, a pure function of (seed, image
index, H, W), so a crop the teacher saw while its outputs were cached can be cut again,
exactly, in a DataLoader worker later (see docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from cqkd.errors import CqkdError

RRC_SCALE = (0.08, 1.0)


RRC_RATIO = (3 / 4, 4 / 3)


REGIONS_FILE = "regions.i32"  # int32 (N, k, 5) in a teacher cache directory


SIZES_FILE = "sizes.i32"  # int32 (N, 2): each image's (H, W) when its regions were drawn


TRIES = 10  # boxes tried before the central fallback, as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class CropSpec:
    """A random-resized crop to ``size`` px (area ``scale``, aspect ``ratio``), then a random flip."""

    size: int
    scale: tuple[float, float] = RRC_SCALE
    ratio: tuple[float, float] = RRC_RATIO
    flip: bool = True

    def spec(self) -> str:
        """One string that names the crop family (part of the teacher cache's key)."""
        s, r = self.scale, self.ratio
        return (f"random-resized-crop={self.size},scale={s[0]:g}-{s[1]:g},ratio={r[0]:.4g}-{r[1]:.4g}"
                + (",flip" if self.flip else ""))


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(n: int, g: torch.Generator | None) -> int:
    return int(torch.randint(0, n, (), generator=g))


def draw_region(h: int, w: int, spec: CropSpec, g: torch.Generator | None = None) -> torch.Tensor:
    """One region (top, left, height, width, flip) of an h x w image, drawn as torchvision's
    RandomResizedCrop draws its box (10 tries, then a central crop of clamped aspect ratio);
    ``g=None`` draws from the global generator."""
    area, (lo, hi) = h * w, (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(TRIES):
        target = area * _uniform(*spec.scale, g)
        aspect = math.exp(_uniform(lo, hi, g))
        bw, bh = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            box = (_randint(h - bh + 1, g), _randint(w - bw + 1, g), bh, bw)
            break
    if box is None:
        ratio = w / h
        bw, bh = (w, round(w / spec.ratio[0])) if ratio < spec.ratio[0] else (
            (round(h * spec.ratio[1]), h) if ratio > spec.ratio[1] else (w, h))
        box = ((h - bh) // 2, (w - bw) // 2, bh, bw)
    flip = int(spec.flip and float(torch.rand((), generator=g)) < 0.5)
    return torch.tensor([*box, flip], dtype=torch.int64)


def cut_region(img: torch.Tensor, region: torch.Tensor, size: int) -> torch.Tensor:
    """The crop ``region`` of a uint8 (C, H, W) image, resized (antialiased) to size x size."""

    top, left, h, w, flip = (int(v) for v in region)
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return (out.flip(-1) if flip else out).contiguous()


class RegionBank:
    """``k`` regions per image, drawn once per image from a generator seeded by (seed, index)."""

    def __init__(self, spec: CropSpec, k: int, seed: int = 0) -> None:
        if not isinstance(k, int) or k < 1:
            raise CqkdError(f"regions per image must be a positive integer, got {k!r}")
        self.spec, self.k, self.seed = spec, k, seed

    def regions(self, index: int, h: int, w: int) -> torch.Tensor:
        """The ``k`` regions (k, 5) of image ``index`` of size h x w."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.stack([draw_region(h, w, self.spec, g) for _ in range(self.k)])

    def describe(self) -> str:
        """A one-line description of the bank: its view spec, views per image and seed."""
        return f"{self.spec.spec()}; bank of {self.k} per image, seed {self.seed}"
