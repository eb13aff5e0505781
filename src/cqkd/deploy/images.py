"""Images from files, PIL or tensors, brought to a run's full-resolution evaluation view."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cqkd.core.io import special_kind
from cqkd.data.folder import (
    IMAGE_EXTENSIONS,
    BadImageError,
    decode_rgb,
    eval_view,
    pil_rgb8,
)
from cqkd.errors import CqkdError

ImageInput = Any  # a tensor, a PIL image, or a path to an image file

# ITU-R BT.601 luma in 16-bit fixed point, as PIL's convert("L"): the weights sum to 65536, so
# a grey image stored as RGB converts back to exactly its grey values
_LUMA = (19595, 38470, 7471)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``: files as given, directories walked recursively (sorted)."""
    if not inputs:
        raise CqkdError("no input: name image files or directories")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise CqkdError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(path)!r}")
            found += files
        elif path.exists():
            found.append(path)
        else:
            raise CqkdError(f"input {str(path)!r} does not exist")
    return list(dict.fromkeys(found))


def read_image(item: ImageInput) -> torch.Tensor:
    """One image (or a batch) as a tensor (C, H, W) or (N, C, H, W): uint8, or float in [0, 1]."""
    if isinstance(item, torch.Tensor):
        return _checked_tensor(item)
    if isinstance(item, (str, os.PathLike)):
        if Path(item).is_dir():
            raise CqkdError(f"{str(item)!r} is a directory; list its images with cqkd.deploy.find_images")
        return read_file(item)
    if isinstance(item, Image.Image):
        arr = torch.from_numpy((np.asarray(item) if item.mode in ("L", "RGB") else pil_rgb8(item)).copy())
        return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()
    raise CqkdError(f"cannot read an image from a {type(item).__name__}: pass a tensor, a PIL image or a file path")


def read_file(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to uint8 RGB (3, H, W) as the run's image folders are read, after
    PIL has checked it (a damaged file then fails here, before libpng writes to stderr)."""
    kind = special_kind(path)
    if kind is not None:  # (a FIFO nobody writes would block open() for ever)
        raise BadImageError(f"cannot decode image file {path} (it is {kind}, not a regular file)")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - any reason PIL cannot read it
        raise BadImageError(f"cannot decode image file {path} ({type(e).__name__}: {e})") from None
    return decode_rgb(str(path))


def _checked_tensor(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim not in (3, 4) or x.shape[-3] not in (1, 2, 3, 4) or 0 in x.shape[-2:]:
        raise CqkdError(f"an image tensor must be (H, W), (C, H, W) or (N, C, H, W) with 1-4 channels, "
                        f"got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise CqkdError(f"an image tensor must be uint8 (0-255) or float in [0, 1], got {x.dtype}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise CqkdError(f"float images must lie in [0, 1] (got values in [{float(x.min()):g}, {float(x.max()):g}]); "
                        "pass uint8 tensors for 0-255 pixels")
    return x


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(…, C, H, W) with C in 1-4 to ``channels`` (1 or 3): drop alpha, grey to RGB by
    repetition, RGB to grey by BT.601 luma (PIL's ``convert("L")`` for uint8)."""
    have = x.shape[-3]
    if have in (2, 4):  # grey + alpha, RGB + alpha: alpha is dropped, as PIL's convert does
        x = x[..., : have - 1, :, :]
        have -= 1
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    if have == 3 and channels == 1:
        r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
        if x.dtype == torch.uint8:
            y = (r.int() * _LUMA[0] + g.int() * _LUMA[1] + b.int() * _LUMA[2] + 0x8000) >> 16
            return y.to(torch.uint8)
        return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]) / 65536
    raise CqkdError(f"cannot convert {have}-channel images to the run's {channels} channels")


def full_view(x: torch.Tensor, image_size: int, folder_crop: int | None) -> torch.Tensor:
    """An image (or batch) as the run's evaluation view at its full resolution.

    Image-folder runs: the evaluation crop of their test split (shorter side resized to
    ``eval_resize(crop)``, centre crop), applied to every image. In-memory datasets: an image
    of the dataset's size is unchanged; any other size is resized (antialiased bilinear) so
    that its shorter side is ``image_size`` and the central square is kept.
    """
    if folder_crop is not None:
        return eval_view(x, folder_crop)
    if tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    if min(x.shape[-2:]) != image_size:
        x = TF.resize(x, [image_size], antialias=True)
    return TF.center_crop(x, [image_size, image_size]).contiguous()
