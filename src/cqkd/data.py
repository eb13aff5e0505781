"""Datasets by name, their splits, and the loaders that feed whole batches.

In-memory datasets (Fashion-MNIST, CIFAR, synthetic) are held as one uint8 tensor
(N, C, H, W) per split. Loaders yield ``(images_uint8, labels, indices)``; augmentation and
degradation run later, on the batch and on the training device (see ``cqkd.views`` and
``cqkd.quality``).

A split is anything with ``labels`` (int64, N), ``__len__``, ``subset(index)`` and
``loader(batch_size, shuffle, ...)`` that builds its own DataLoader: ``ImageData`` (in memory)
here, ``FolderSplit`` (decoded from files in DataLoader workers) in ``cqkd.data_folder``.
Datasets whose loader already augments (``DatasetInfo.loader_augments``) get no batch views.

Splits: ``train`` (what the model learns from), ``val`` (held out of the official training
set with a fixed seed; checkpoint selection and calibration), ``test`` (the official test set;
used for nothing but the final report).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cqkd.errors import CqkdError, unknown_name

SPLIT_SEED = 0  # the val split and train subsets never depend on the run's seed
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    loader_augments: bool = False  # the training loader already draws the views (imagefolder)


@dataclass
class ImageData:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageData":
        return ImageData(self.images[index], self.labels[index])

    def loader(self, batch_size: int, shuffle: bool, num_workers: int = 0, drop_last: bool = False,
               seed: int = 0, pin_memory: bool = False) -> DataLoader:
        return make_loader(self, batch_size, shuffle, num_workers, drop_last, seed, pin_memory)


@dataclass
class Splits:
    info: DatasetInfo
    train: ImageData  # or any split with the same interface (see the module docstring)
    val: ImageData
    test: ImageData
    source: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def split(self, name: str) -> ImageData:
        if name not in ("train", "val", "test"):
            raise CqkdError(f"unknown split {name!r} (valid: train, val, test)")
        return getattr(self, name)


class TensorSplit(Dataset):
    """A map-style dataset over an in-memory split whose batched fetch is one indexing op."""

    def __init__(self, data: ImageData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data.images[i], self.data.labels[i], torch.tensor(i)

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.data.images[idx], self.data.labels[idx], idx


def _batch_passthrough(batch):
    """``__getitems__`` already returns a collated batch."""
    return batch


def make_loader(data: ImageData, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False, seed: int = 0, pin_memory: bool = False) -> DataLoader:
    if not isinstance(data, ImageData):  # a split that builds its own loader
        return data.loader(batch_size, shuffle, num_workers, drop_last, seed, pin_memory)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorSplit(data), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
        num_workers=num_workers, collate_fn=_batch_passthrough, generator=generator,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
    )


# --------------------------------------------------------------------------- registry

Loader = Callable[..., Splits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn
    return wrap


def _register_builtin() -> None:
    """Import the modules that register datasets beyond the ones in this file."""
    import cqkd.data_cifar  # noqa: F401
    import cqkd.data_folder  # noqa: F401


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 train_samples: int | None = None, val_size: int | None = None,
                 **options: object) -> Splits:
    """Load a dataset's train/val/test splits by name.

    ``train_samples`` keeps a fixed class-balanced subset of the training split. ``options``
    (e.g. ``crop_size``, ``skip_bad_images``, ``augment``) go to the datasets that take them
    and are ignored by the others.
    """
    _register_builtin()
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CqkdError(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")
    import inspect

    fn = DATASETS[name]
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, object] = {"data_dir": data_dir}
    if val_size is not None:
        kwargs["val_size"] = val_size
    kwargs.update({k: v for k, v in options.items() if k in accepted})
    splits = fn(**kwargs)
    if train_samples is not None:
        splits.train = splits.train.subset(balanced_subset(splits.train.labels, train_samples))
    return splits


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    return load_dataset(name, data_dir).info


def balanced_subset(labels: torch.Tensor, n: int, seed: int = SPLIT_SEED) -> torch.Tensor:
    """Indices of a fixed, class-balanced subset of ``n`` samples (sorted)."""
    if n < 1:
        raise CqkdError(f"--train-samples must be at least 1, got {n}")
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes.tolist(), per_class):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.sort(torch.cat(chosen)).values


def hold_out(data: ImageData, val_size: int, seed: int = SPLIT_SEED) -> tuple[ImageData, ImageData]:
    """Split ``data`` into (train, val) with a fixed random permutation."""
    if not 0 < val_size < len(data):
        raise CqkdError(f"val size must be between 1 and {len(data) - 1}, got {val_size}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = torch.sort(perm[:val_size]).values, torch.sort(perm[val_size:]).values
    return data.subset(train_idx), data.subset(val_idx)


# --------------------------------------------------------------------------- Fashion-MNIST

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
    import torchvision

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


# --------------------------------------------------------------------------- synthetic

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
