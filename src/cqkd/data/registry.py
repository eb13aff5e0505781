"""Datasets by name, their splits, and the loaders that feed whole batches.

Details: docs/architecture.md.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cqkd.errors import CqkdError, unknown_name

SPLIT_SEED = 0  # the val split and train subsets never depend on the run's seed


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's name, classes, channels, image size and normalisation statistics."""
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
        """The split restricted to the images at ``index``."""
        return ImageData(self.images[index], self.labels[index])

    def loader(self, batch_size: int, shuffle: bool, num_workers: int = 0, drop_last: bool = False,
               seed: int = 0, pin_memory: bool = False) -> DataLoader:
        """A DataLoader over this split (see :func:`make_loader`)."""
        return make_loader(self, batch_size, shuffle, num_workers, drop_last, seed, pin_memory)


@dataclass
class Splits:
    """A dataset's info and its train, val and test splits."""
    info: DatasetInfo
    train: ImageData  # or any split with the same interface (see docs/architecture.md)
    val: ImageData
    test: ImageData
    source: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def split(self, name: str) -> ImageData:
        """The split called ``name`` (train, val or test)."""
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
    """A seeded DataLoader over an in-memory split, or the split's own loader for any other kind."""
    if not isinstance(data, ImageData):  # a split that builds its own loader
        return data.loader(batch_size, shuffle, num_workers, drop_last, seed, pin_memory)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorSplit(data), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
        num_workers=num_workers, collate_fn=_batch_passthrough, generator=generator,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
    )


Loader = Callable[..., Splits]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator registering a dataset loader under ``name``."""
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn
    return wrap


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 train_samples: int | None = None, val_size: int | None = None,
                 **options: object) -> Splits:
    """Load a dataset's train/val/test splits by name.

    ``train_samples`` keeps a fixed class-balanced subset of the training split. ``options``
    (e.g. ``crop_size``, ``skip_bad_images``, ``augment``) go to the datasets that take them
    and are ignored by the others.
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CqkdError(f"--data-dir {str(data_dir)!r} does not exist or is not a directory")

    fn = DATASETS[name]
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, object] = {"data_dir": data_dir}
    if val_size is not None:
        kwargs["val_size"] = val_size
    kwargs.update({k: v for k, v in options.items() if k in accepted})
    splits = fn(**kwargs)
    if train_samples is not None:
        if train_samples > len(splits.train):
            raise CqkdError(f"--train-samples {train_samples} is more than the {len(splits.train)} images of the "
                            f"{name} train split")
        splits.train = splits.train.subset(balanced_subset(splits.train.labels, train_samples))
    return splits


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of dataset ``name``."""
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


def check_data_dir(data_dir: str | None) -> None:
    """A --data-dir that exists must also be readable (load_dataset checks that it exists)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise CqkdError(f"--data-dir {data_dir!r} is not readable (permission denied)")
    try:
        next(os.scandir(data_dir), None)
    except OSError as e:
        raise CqkdError(f"--data-dir {data_dir!r} cannot be read: {e.strerror}") from None
