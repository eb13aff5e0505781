"""ImageNet-style image folders, decoded in DataLoader workers.

Details: docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import make_dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from cqkd.core.io import special_kind
from cqkd.data.registry import SPLIT_SEED, DatasetInfo, Splits, register_dataset
from cqkd.errors import CqkdError
from cqkd.views.augment import BANK_SEED
from cqkd.views.regions import (
    REGIONS_FILE,
    SIZES_FILE,
    CropSpec,
    RegionBank,
    cut_region,
    draw_region,
)

log = logging.getLogger("cqkd.data")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


MAX_REPLACEMENTS = 100  # consecutive unreadable files tolerated when skipping


class BadImageError(CqkdError):
    """An image file that cannot be decoded.

    A DataLoader worker re-raises it in the main process with the worker's traceback as the
    message; the constructor keeps only the original one-line message.
    """

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[-1] if "Error: " in last else last
        super().__init__(message)


def eval_resize(crop_size: int) -> int:
    """The shorter side before the evaluation centre crop: 256 for 224, proportional otherwise."""
    return max(crop_size, round(crop_size * 256 / 224))


def decode_rgb(path: str) -> torch.Tensor:
    """Decode an image file to uint8 RGB (3, H, W): torchvision's decoders, PIL as fallback.

    Every mode comes out the same way as its 8-bit RGB picture: the EXIF orientation applied,
    16-bit samples rounded to 8 bits (``round(v * 255 / 65535)``), palette expanded, alpha
    dropped, CMYK through PIL. A device, FIFO or socket is refused before it is opened (reading
    a FIFO nobody writes would block for ever)."""
    kind = special_kind(path)
    if kind is not None:
        raise BadImageError(f"cannot decode image file {path} (it is {kind}, not a regular file)")
    try:
        img = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        if img.dtype == torch.uint16:
            img = to_uint8(img)
        if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and img.shape[1] > 0 and img.shape[2] > 0:
            return img
    except Exception:  # noqa: BLE001 - any decoder failure: try PIL before giving up
        pass
    try:
        with Image.open(path) as im:
            arr = pil_rgb8(im)
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError("empty image")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as e:  # noqa: BLE001
        raise BadImageError(f"cannot decode image file {path} ({type(e).__name__}: {e})") from None


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """16-bit samples (0-65535) to 8 bits, rounded: v * 257 (the same picture stored 16-bit) gives back v."""
    return ((x.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def pil_rgb8(im: Any) -> np.ndarray:
    """A PIL image of any mode as uint8 RGB (H, W, 3), upright (EXIF orientation applied), 16-bit
    and 32-bit integer grey scaled from 0-65535 like ``to_uint8``."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs, TIFFs): 0-65535
        a = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def train_view(img: torch.Tensor, crop_size: int) -> torch.Tensor:
    """A fresh random resized crop to ``crop_size`` and a random horizontal flip (global torch
    RNG, seeded per worker by Lightning)."""
    return cut_region(img, draw_region(img.shape[1], img.shape[2], CropSpec(crop_size)), crop_size)


def eval_view(img: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Resize the shorter side to ``eval_resize(crop_size)``, then the central square crop."""
    out = TF.resize(img, [eval_resize(crop_size)], antialias=True)
    return TF.center_crop(out, [crop_size, crop_size]).contiguous()


class FolderSplit(Dataset):
    """A split of an image folder: file paths and labels; decodes in ``__getitem__``.

    Implements the split interface of ``cqkd.data`` (``labels``, ``len``, ``subset``,
    ``loader``). ``augment`` selects the training view, else the evaluation view; with
    ``regions`` the training views come from that bank and items are ``(index, j)`` pairs.
    """

    def __init__(self, name: str, paths: list[str], labels: torch.Tensor, crop_size: int,
                 augment: bool, skip_bad: bool, regions: RegionBank | None = None) -> None:
        self.name = name
        self.paths = paths
        self.labels = labels
        self.crop_size = crop_size
        self.augment = augment
        self.skip_bad = skip_bad
        self.regions = regions
        self.stored: Path | None = None  # a teacher cache whose regions the workers replay
        self._stored_arrays: tuple[np.ndarray, np.ndarray] | None = None
        # one flag per file, shared with (forked or spawned) DataLoader workers
        self._bad = multiprocessing.RawArray("b", max(len(paths), 1))

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> "FolderSplit":
        """The split restricted to the images at ``index``."""
        idx = index.tolist()
        return FolderSplit(self.name, [self.paths[i] for i in idx], self.labels[index],
                           self.crop_size, self.augment, self.skip_bad, self.regions)

    def _decode(self, i: int) -> tuple[int, torch.Tensor]:
        """(j, image): image ``i``, or with ``skip_bad`` the next readable one ``j``."""
        for k in range(MAX_REPLACEMENTS):
            j = (i + k) % len(self.paths)
            try:
                return j, decode_rgb(self.paths[j])
            except BadImageError as e:
                if not self.skip_bad:
                    raise BadImageError(f"{e}; pass --skip-bad-images to skip unreadable files") from None
                if not self._bad[j]:
                    self._bad[j] = 1
                    log.warning("skipping unreadable image: %s", e)
        raise BadImageError(f"{MAX_REPLACEMENTS} consecutive unreadable images in the {self.name} split "
                            f"from {self.paths[i]}; is --data-dir right?")

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, tuple):  # (index, j): region j of the image's bank
            i, which = item
            j, img = self._decode(i)
            return cut_region(img, self.region(j, which, img), self.crop_size), int(self.labels[j]), j, which
        j, img = self._decode(item)
        view = train_view(img, self.crop_size) if self.augment else eval_view(img, self.crop_size)
        return view, int(self.labels[j]), j

    def region(self, j: int, which: int, img: torch.Tensor) -> torch.Tensor:
        """Region ``which`` of image ``j``: replayed from the teacher cache, else drawn from the bank."""
        assert self.regions is not None
        h, w = img.shape[1:]
        if self.stored is None:
            return self.regions.regions(j, h, w)[which]
        if self._stored_arrays is None:  # opened lazily, once per worker process
            n, k = len(self.paths), self.regions.k
            self._stored_arrays = (np.memmap(self.stored / REGIONS_FILE, dtype="<i4", mode="r", shape=(n, k, 5)),
                                   np.memmap(self.stored / SIZES_FILE, dtype="<i4", mode="r", shape=(n, 2)))
        regions, sizes = self._stored_arrays
        if (int(sizes[j, 0]), int(sizes[j, 1])) != (h, w):
            raise CqkdError(f"{self.paths[j]} is {h}x{w} px but was {sizes[j, 0]}x{sizes[j, 1]} when the teacher "
                            f"cache {self.stored} was built; delete that cache directory to rebuild it")
        return torch.from_numpy(regions[j, which].astype(np.int64))

    def bank_views(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``k`` bank crops of image ``i`` (k, 3, S, S), their regions (k, 5) and the image size (2)."""
        assert self.regions is not None
        j, img = self._decode(i)
        regions = self.regions.regions(j, *img.shape[1:])
        crops = torch.stack([cut_region(img, r, self.crop_size) for r in regions])
        return crops, regions.to(torch.int32), torch.tensor(img.shape[1:], dtype=torch.int32)

    def replay(self, cache_dir: Path | None) -> None:
        """Cut the training crops from the regions stored in ``cache_dir`` (None: from the bank)."""
        self.stored, self._stored_arrays = cache_dir, None

    def digest(self) -> str:
        """sha256 (16 hex digits) of the files' class/name and byte size, in order (cheap: one stat each)."""
        h = hashlib.sha256()
        for path in self.paths:
            h.update(f"{Path(path).parent.name}/{Path(path).name}\0{os.stat(path).st_size}\n".encode())
        return h.hexdigest()[:16]

    def loader(self, batch_size: int, shuffle: bool, num_workers: int = 0, drop_last: bool = False,
               seed: int = 0, pin_memory: bool = False) -> DataLoader:
        """A DataLoader over this split, seeded by ``seed`` (with a region-bank sampler when the split has regions)."""
        generator = torch.Generator().manual_seed(seed)
        sampler = BankSampler(len(self), self.regions.k, shuffle, generator) if self.regions is not None else None
        return DataLoader(
            self, batch_size=batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
            drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
            generator=generator,
        )

    def skipped(self) -> list[str]:
        """The files skipped so far as unreadable (by this process and its workers)."""
        flags = np.frombuffer(self._bad, dtype=np.int8)[: len(self.paths)]
        return [self.paths[j] for j in np.flatnonzero(flags).tolist()]


class BankSampler(Sampler[tuple[int, int]]):
    """(index, j) pairs: every image once per epoch (shuffled or in order), each with a bank view
    ``j`` drawn uniformly from ``[0, k)``; both from ``generator``."""

    def __init__(self, n: int, k: int, shuffle: bool, generator: torch.Generator) -> None:
        self.n, self.k, self.shuffle, self.generator = n, k, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator function, like RandomSampler: nothing is drawn before the first item is asked for
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        which = torch.randint(0, self.k, (self.n,), generator=self.generator)
        yield from zip(order.tolist(), which.tolist())


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan(root: Path, classes: tuple[str, ...] | None = None) -> tuple[list[str], torch.Tensor, tuple[str, ...]]:
    """Image paths and labels under ``root/<class>/`` (sorted), and the classes."""
    if not root.is_dir():
        raise CqkdError(f"{root} does not exist or is not a directory (expected DIR/train/<class>/ and DIR/val/<class>/)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = tuple(found)
        if not classes:
            raise CqkdError(f"{root} has no class sub-directories")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise CqkdError(f"{root} has class {unknown[0]!r} that is not in the training classes")
    index = {c: k for k, c in enumerate(classes)}
    samples = make_dataset(str(root), {c: index[c] for c in found}, is_valid_file=_is_image, allow_empty=True)
    paths = [p for p, _ in samples]
    labels = [k for _, k in samples]
    if not paths:
        raise CqkdError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return paths, torch.tensor(labels, dtype=torch.int64), classes


def default_val_size(n: int) -> int:
    """The validation split's size for ``n`` training images: 2%, at least 1 and at most 10,000."""
    return max(1, min(10_000, round(0.02 * n)))


@register_dataset("imagefolder")
def load_imagefolder(data_dir: str | os.PathLike | None = None, val_size: int | None = None,
                     crop_size: int = 224, skip_bad_images: bool = False, augment: str = "flip",
                     views_per_image: int | str | None = None) -> Splits:
    """An ImageNet-style folder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (= test);
    an integer ``views_per_image`` gives the training split a bank of that many regions per image."""
    if data_dir is None:
        raise CqkdError("--dataset imagefolder needs --data-dir DIR with DIR/train/<class>/ and DIR/val/<class>/")
    if crop_size < 1:
        raise CqkdError(f"crop_size must be at least 1, got {crop_size}")
    d = Path(data_dir)
    paths, labels, classes = scan(d / "train")
    test_paths, test_labels, _ = scan(d / "val", classes)
    n_val = default_val_size(len(paths)) if val_size is None else val_size
    if not 0 < n_val < len(paths):
        raise CqkdError(f"val_size must be between 1 and {len(paths) - 1} for {d / 'train'}, got {n_val}")
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = torch.sort(perm[:n_val]).values, torch.sort(perm[n_val:]).values
    augment_train = augment.strip() not in ("none", "off", "")
    bank = RegionBank(CropSpec(crop_size), views_per_image, BANK_SEED) if (
        augment_train and isinstance(views_per_image, int)) else None
    full = FolderSplit("train", paths, labels, crop_size, augment_train, skip_bad_images, bank)
    train = full.subset(train_idx)
    val = FolderSplit("val", [paths[i] for i in val_idx.tolist()], labels[val_idx], crop_size, False, skip_bad_images)
    test = FolderSplit("test", test_paths, test_labels, crop_size, False, skip_bad_images)
    info = DatasetInfo("imagefolder", len(classes), 3, crop_size, IMAGENET_MEAN, IMAGENET_STD, classes,
                       loader_augments=True)
    views = f"random-resized-crop={crop_size},flip" if augment_train else f"resize={eval_resize(crop_size)},center-crop={crop_size}"
    if bank is not None:
        views += f", bank of {bank.k} per image"
    return Splits(info, train, val, test, source=str(d),
                  extra={"train_views": views, "eval_views": f"resize={eval_resize(crop_size)},center-crop={crop_size}"})


def skipped_files(splits: Splits) -> list[str]:
    """Every file skipped as unreadable in any split, gathered over all processes of a
    distributed run (a collective: call it on every rank)."""
    local = sorted({p for s in (splits.train, splits.val, splits.test) for p in getattr(s, "skipped", list)()})
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = sorted({p for part in gathered for p in (part or [])})
    return local
