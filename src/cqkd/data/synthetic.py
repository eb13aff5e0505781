"""A synthetic dataset whose classes differ only in detail that a low resolution averages away."""

from __future__ import annotations

import os

import torch

from cqkd.data.registry import (
    DatasetInfo,
    ImageData,
    Splits,
    hold_out,
    register_dataset,
)


def make_synthetic(n: int, seed: int, size: int = 28, num_classes: int = 10) -> ImageData:
    """Deterministic synthetic images whose class lives partly in fine detail.

    Class ``c`` = (coarse group ``c // 2``, fine bit ``c % 2``). The coarse group sets the
    vertical position of a soft blob (visible at any resolution, invariant to horizontal
    flips); the fine bit sets the orientation of period-2 stripes inside the blob, which a
    low-pass resize to half the size or less averages away. A low-resolution classifier can
    therefore only find the group, the full-resolution one can find the class.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    groups = (num_classes + 1) // 2
    coarse, fine = labels // 2, labels % 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    centers_y = (coarse.float() + 0.5) * size / groups + torch.randint(-1, 2, (n,), generator=g)
    centers_x = size / 2 - 0.5 + torch.randint(-2, 3, (n,), generator=g)
    sigma = size / (2.2 * groups) + 1.5
    blob = torch.exp(-((yy - centers_y.view(-1, 1, 1)) ** 2 + (xx - centers_x.view(-1, 1, 1)) ** 2) / (2 * sigma**2))
    horizontal = ((yy.long() % 2) == 0).float()
    vertical = ((xx.long() % 2) == 0).float()
    stripes = torch.where(fine.view(-1, 1, 1) == 0, horizontal, vertical)
    amplitude = 0.7 + 0.3 * torch.rand(n, 1, 1, generator=g)
    img = amplitude * blob * (0.35 + 0.65 * stripes) + 0.08 * torch.randn(n, size, size, generator=g)
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8).unsqueeze(1)
    return ImageData(images, labels.to(torch.int64))


@register_dataset("synthetic")
def load_synthetic(data_dir: str | os.PathLike | None = None, val_size: int = 500) -> Splits:
    """A small, deterministic, in-memory dataset for tests: 4,000 train, 500 val, 1,000 test."""
    full = make_synthetic(4000 + val_size, seed=1)
    train, val = hold_out(full, val_size)
    test = make_synthetic(1000, seed=2)
    mean = float(full.images.float().mean() / 255)
    std = float(full.images.float().std() / 255)
    info = DatasetInfo("synthetic", 10, 1, 28, (round(mean, 4),), (round(std, 4),),
                       tuple(f"class-{i}" for i in range(10)))
    return Splits(info, train, val, test, source="generated")
