"""Fashion-MNIST: from --data-dir, Debian's dataset-fashion-mnist, or torchvision's download."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torchvision

from cqkd.data.registry import (
    DatasetInfo,
    ImageData,
    Splits,
    hold_out,
    register_dataset,
)
from cqkd.errors import CqkdError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CqkdError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CqkdError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise CqkdError(f"{path} is truncated or corrupt ({len(raw) - offset} bytes of data, expected {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all((d / f).exists() or (d / f"{f}.gz").exists() for f in _IDX_FILES.values()):
            return d
    return None


def _idx_path(d: Path, stem: str) -> Path:
    return d / stem if (d / stem).exists() else d / f"{stem}.gz"


def _torchvision_download() -> Path:
    root = Path(os.environ.get("CQKD_CACHE", Path.home() / ".cache" / "cqkd")) / "data"
    torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


@register_dataset("fashion-mnist")
def load_fashion_mnist(data_dir: str | os.PathLike | None = None, val_size: int = 5000) -> Splits:
    """Fashion-MNIST (Xiao et al., 2017): 60,000 training and 10,000 test images, 28x28 gray.

    Looked up in ``data_dir`` (IDX files, gzipped or not, directly or under FashionMNIST/raw),
    then in Debian's ``dataset-fashion-mnist`` package, then downloaded by torchvision.
    """
    if data_dir is not None:
        d = Path(data_dir)
        found = _find_idx_dir([d, d / "FashionMNIST" / "raw", d / "fashion-mnist", d / "raw"])
        if found is None:
            raise CqkdError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in --data-dir {str(d)!r}")
    else:
        found = _find_idx_dir([DEBIAN_FASHION_MNIST])
        if found is None:
            try:
                found = _torchvision_download()
            except Exception as e:  # no internet, blocked, disk full...
                raise CqkdError(
                    "Fashion-MNIST not found: pass --data-dir DIR holding its IDX files, or install "
                    "Debian's package (apt-get install dataset-fashion-mnist), or allow torchvision "
                    f"to download it (download failed: {type(e).__name__})") from None
    arrays = {k: read_idx(_idx_path(found, stem)) for k, stem in _IDX_FILES.items()}
    train = ImageData(torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
                      torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    test = ImageData(torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
                     torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    train, val = hold_out(train, val_size)
    info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), FASHION_CLASSES)
    return Splits(info, train, val, test, source=str(found))
