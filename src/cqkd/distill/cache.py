"""A cache of the teacher's outputs on every bank view: built once in resumable chunks, verified, memory-mapped.

``<teacher_run>/cache/<key>/`` holds ``header.json`` and raw little-endian arrays: the targets
(``logits.f16`` (N·k, C), or ``topk_index.i16`` (N·k, t) and ``topk_logits.f16`` (N·k, t+1))
and the views they were computed on (``views.i16`` (N, k, 3) for in-memory datasets;
``regions.i32`` (N, k, 5) and ``sizes.i32`` (N, 2) for image folders). Row ``i·k + j`` is view
``j`` of image ``i``. The key hashes the ``CacheSpec``; the layout, checks and costs are in
docs/performance.md.
Building, opening and waiting for a cache: ``cqkd.distill.cache_build``.
One process builds a key at a time (``.<key>.lock``, see ``cqkd.core.lock``); the others wait for
it, and the next builder removes what a killed one left (``.tmp-<key>-*``, ``.trash-<key>-*``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqkd.core.io import file_sha256, read_json
from cqkd.core.progress import say
from cqkd.distill.targets import topk_decode
from cqkd.errors import CqkdError
from cqkd.views.augment import BANK_SEED, ViewBank
from cqkd.views.regions import REGIONS_FILE, SIZES_FILE, RegionBank

__all__ = ["BANK_SEED", "CacheInvalid", "CacheSpec", "TeacherCache"]

FORMAT = "cqkd-teacher-cache"


VERSION = 1


HEADER_FILE = "header.json"


LOGITS_FILE = "logits.f16"


TOPK_INDEX_FILE = "topk_index.i16"


TOPK_LOGITS_FILE = "topk_logits.f16"


VIEWS_FILE = "views.i16"


CHUNK_VIEWS = 1 << 16  # views per resumable chunk of a build


LATE_SPEC = {"topk": None, "teacher_precision": "32"}  # spec fields left out of the key at these values

Produce = Callable[[int, int], Iterable[tuple[torch.Tensor, dict[str, np.ndarray]]]]
"""``produce(start, stop)``: for images ``start..stop-1`` in order, batches of (their ``n·k`` views,
uint8 or float, image-major; ``{file name: array}`` of the view tables for those ``n`` images)."""


class CacheInvalid(Exception):
    """A cache directory that must not be read (missing, truncated, corrupt or stale)."""


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the cached teacher outputs."""

    teacher_digest: str
    teacher_model: str
    teacher_input_size: int
    dataset: str
    split: str
    train_samples: int | None
    data_digest: str
    num_images: int
    num_classes: int
    views: str
    k: int
    bank_seed: int
    topk: int | None = None  # keep the t largest logits and the rest's mass (None: every logit)
    teacher_precision: str = "32"  # the autocast the teacher ran under ("32": none)

    def fields(self) -> dict[str, Any]:
        """The spec as stored in the header (late fields only where they differ from their default)."""
        return {k: v for k, v in asdict(self).items() if not (k in LATE_SPEC and v == LATE_SPEC[k])}

    def key(self) -> str:
        """The cache's key: a 16-hex-digit SHA-256 of the format, version and spec fields."""
        payload = json.dumps({"format": FORMAT, "version": VERSION, **self.fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def regions(self) -> bool:
        """Random-resized-crop regions of image files (else flip/translate views of in-memory images)."""
        return self.views.startswith("random-resized-crop")

    def files(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Each data file's numpy dtype and shape."""
        n, k, rows = self.num_images, self.k, self.num_images * self.k
        out = ({LOGITS_FILE: ("<f2", (rows, self.num_classes))} if self.topk is None else
               {TOPK_INDEX_FILE: ("<i2", (rows, self.topk)), TOPK_LOGITS_FILE: ("<f2", (rows, self.topk + 1))})
        if self.regions:
            out.update({REGIONS_FILE: ("<i4", (n, k, 5)), SIZES_FILE: ("<i4", (n, 2))})
        else:
            out[VIEWS_FILE] = ("<i2", (n, k, 3))
        return out

    def file_bytes(self, name: str) -> int:
        """Bytes of data file ``name``."""
        dtype, shape = self.files()[name]
        return math.prod(shape) * np.dtype(dtype).itemsize

    @property
    def logits_bytes(self) -> int:
        """Bytes of the teacher's targets (without the view tables)."""
        return sum(self.file_bytes(f) for f in self.files() if f in (LOGITS_FILE, TOPK_INDEX_FILE, TOPK_LOGITS_FILE))

    @property
    def views_bytes(self) -> int:
        """Bytes of the view tables (without the teacher's targets)."""
        return sum(self.file_bytes(f) for f in self.files()) - self.logits_bytes

    def chunk_images(self, chunk_views: int = CHUNK_VIEWS) -> int:
        """Images per build chunk: ``chunk_views`` divided by the views per image (at least 1)."""
        return max(1, chunk_views // self.k)


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a tensor's bytes, with its dtype and shape."""
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _header_checksum(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read(path: Path, spec: CacheSpec, name: str) -> np.ndarray:
    dtype, shape = spec.files()[name]
    return np.fromfile(path / name, dtype=dtype).reshape(shape)


def _memmap(path: Path, spec: CacheSpec, name: str) -> np.memmap:
    dtype, shape = spec.files()[name]
    return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)


class TeacherCache:
    """An opened, verified cache: ``lookup(index, which)`` gives the teacher's logits."""

    def __init__(self, path: Path, spec: CacheSpec, header: dict) -> None:
        self.path, self.spec, self.header = path, spec, header
        if spec.topk is None:
            self.logits = _memmap(path, spec, LOGITS_FILE)
        else:
            self.topk_index = _memmap(path, spec, TOPK_INDEX_FILE)
            self.topk_logits = _memmap(path, spec, TOPK_LOGITS_FILE)

    @classmethod
    def open(cls, path: Path, spec: CacheSpec, bank: ViewBank | RegionBank) -> "TeacherCache":
        """Open the cache in ``path`` after checking every part of it; raise CacheInvalid if any
        check fails (nothing of an invalid cache is returned)."""
        header = _check_header(path, spec)
        for name in spec.files():
            f, expected = path / name, spec.file_bytes(name)
            size = f.stat().st_size if f.is_file() else -1
            if size != expected or header.get("bytes", {}).get(name) != expected:
                raise CacheInvalid(f"{name} has {size} bytes, expected {expected} (truncated?)")
            if file_sha256(f) != header.get("sha256", {}).get(name):
                raise CacheInvalid(f"{name} checksum mismatch (corrupt)")
        if spec.regions:
            _check_regions(path, spec, bank)
        else:
            views = _read(path, spec, VIEWS_FILE).astype(np.int64)
            if not torch.equal(torch.from_numpy(views), bank.all_params()):
                raise CacheInvalid("stored views differ from the view bank")
        return cls(path, spec, header)

    def lookup(self, index: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """float32 logits (n, C) of view ``which[i]`` of image ``index[i]`` (on CPU)."""
        rows = index.cpu().numpy().astype(np.int64) * self.spec.k + which.cpu().numpy()
        if self.spec.topk is None:
            return torch.from_numpy(self.logits[rows].astype(np.float32))
        index_t = torch.from_numpy(self.topk_index[rows].astype(np.int64))
        return topk_decode(index_t, torch.from_numpy(self.topk_logits[rows].astype(np.float32)),
                           self.spec.num_classes)

    def quality(self) -> dict[str, Any]:
        """What metrics.json records about the approximation of a top-k cache."""
        return dict(self.header.get("topk_error", {}))


def _check_header(path: Path, spec: CacheSpec) -> dict:
    header_file = path / HEADER_FILE
    if not header_file.is_file():
        raise CacheInvalid("no header")
    try:
        header = read_json(header_file)
    except CqkdError as e:
        raise CacheInvalid(f"unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheInvalid("not a cqkd teacher cache header")
    if header.get("header_sha256") != _header_checksum(header):
        raise CacheInvalid("header checksum mismatch")
    if header.get("version") != VERSION:
        raise CacheInvalid(f"format version {header.get('version')} (expected {VERSION})")
    if header.get("spec") != spec.fields() or header.get("key") != spec.key():
        raise CacheInvalid("header describes another cache")
    return header


def _check_regions(path: Path, spec: CacheSpec, bank: RegionBank, sample: int = 64) -> None:
    """Every stored box lies inside its image, and a sample equals the bank's regions."""
    regions, sizes = _read(path, spec, REGIONS_FILE), _read(path, spec, SIZES_FILE)
    top, left, h, w, flip = (regions[..., c] for c in range(5))
    height, width = sizes[:, :1], sizes[:, 1:]
    inside = (top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= height) & (left + w <= width)
    if not (inside.all() and np.isin(flip, (0, 1)).all()):
        raise CacheInvalid("stored regions lie outside their images")
    for i in np.unique(np.linspace(0, spec.num_images - 1, min(sample, spec.num_images)).astype(int)).tolist():
        expected = bank.regions(i, int(sizes[i, 0]), int(sizes[i, 1])).numpy()
        if not np.array_equal(regions[i], expected):
            raise CacheInvalid(f"stored regions of image {i} differ from the region bank")


# ---------------------------------------------------------------------- building

def _log(message: str) -> None:
    say(f"cqkd: {message}")
