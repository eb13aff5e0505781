"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from torchvision's on-disk format, held in memory.

``--data-dir DIR`` must hold ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``,
``test_batch``, ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``), as
unpacked from the official archives (or left by ``torchvision.datasets.CIFAR10(download=True)``).
Nothing is downloaded here. The batches are Python pickles; they are read with an unpickler
that only accepts the few numpy globals the format needs, so a tampered file cannot run code.

Images: uint8 (N, 3, 32, 32); 50,000 training images (5,000 held out as ``val`` with a fixed
seed) and the official 10,000 test images. Mean and std per channel are computed exactly from
the training split's pixel histograms.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from cqkd.data.registry import (
    DatasetInfo,
    ImageData,
    Splits,
    hold_out,
    register_dataset,
)
from cqkd.errors import CqkdError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, object]:
    """One CIFAR pickle as a dict with str keys (the files use bytes keys)."""
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise CqkdError(f"{path} is missing") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise CqkdError(f"{path} is corrupt or not a CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CqkdError(f"{path} is not a CIFAR batch (not a mapping)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _images_labels(batches: list[dict[str, object]], label_key: str, path: Path) -> ImageData:
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except (KeyError, ValueError) as e:
        raise CqkdError(f"{path}: unexpected CIFAR batch contents ({type(e).__name__}: {e})") from None
    if len(data) != len(labels):
        raise CqkdError(f"{path}: {len(data)} images but {len(labels)} labels")
    return ImageData(torch.from_numpy(data.copy()), torch.from_numpy(labels))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images (N, C, H, W) in [0, 1] units."""
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).long(), minlength=256).double()
        p = hist / hist.sum()
        mean = float((p * values).sum())
        std = float((p * (values - mean) ** 2).sum().sqrt())
        means.append(round(mean, 4))
        stds.append(round(std, 4))
    return tuple(means), tuple(stds)


def _require_dir(data_dir: str | os.PathLike | None, sub: str, name: str) -> Path:
    if data_dir is None:
        raise CqkdError(f"{name} needs --data-dir DIR holding {sub}/ (torchvision's format; cqkd never downloads it)")
    d = Path(data_dir)
    for candidate in (d / sub, d):
        if candidate.is_dir() and (candidate / ("test_batch" if sub.startswith("cifar-10-") else "test")).exists():
            return candidate
    raise CqkdError(f"no {sub}/ in --data-dir {str(d)!r} (expected the unpacked python version of {name})")


def _names(meta: dict[str, object], key: str, n: int) -> tuple[str, ...]:
    names = meta.get(key)
    if isinstance(names, list) and len(names) == n:
        return tuple(x.decode() if isinstance(x, bytes) else str(x) for x in names)
    return tuple(f"class-{i}" for i in range(n))


def _load(name: str, d: Path, train_files: list[Path], test_file: str, meta_file: str, label_key: str,
          names_key: str, num_classes: int, val_size: int) -> Splits:
    """Both CIFARs: read the batches, hold out val with the fixed split seed, describe them."""
    train = _images_labels([read_batch(f) for f in train_files], label_key, d)
    test = _images_labels([read_batch(d / test_file)], label_key, d)
    meta = read_batch(d / meta_file) if (d / meta_file).exists() else {}
    mean, std = channel_stats(train.images)
    train, val = hold_out(train, val_size)
    info = DatasetInfo(name, num_classes, 3, 32, mean, std, _names(meta, names_key, num_classes))
    return Splits(info, train, val, test, source=str(d))


@register_dataset("cifar10")
def load_cifar10(data_dir: str | os.PathLike | None = None, val_size: int = 5000) -> Splits:
    """CIFAR-10: 10 classes, 50,000 train + 10,000 test images of 32x32 RGB."""
    d = _require_dir(data_dir, "cifar-10-batches-py", "cifar10")
    train_files = sorted(d.glob("data_batch_*"))
    if not train_files:
        raise CqkdError(f"no data_batch_* files in {d}")
    return _load("cifar10", d, train_files, "test_batch", "batches.meta", "labels", "label_names", 10, val_size)


@register_dataset("cifar100")
def load_cifar100(data_dir: str | os.PathLike | None = None, val_size: int = 5000) -> Splits:
    """CIFAR-100: 100 (fine) classes, 50,000 train + 10,000 test images of 32x32 RGB."""
    d = _require_dir(data_dir, "cifar-100-python", "cifar100")
    return _load("cifar100", d, [d / "train"], "test", "meta", "fine_labels", "fine_label_names", 100, val_size)
