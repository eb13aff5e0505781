"""A view-aware cache of the teacher's outputs: build once, memory-map, check, never misread.

Distillation draws each training view from a fixed per-image bank of ``k`` views
(``cqkd.views.ViewBank``), so every teacher output a run can ask for is known in advance:
``logits[i, j] = teacher(view j of image i)``. This module stores those outputs as float16 in
a memory-mapped file next to the teacher run::

    <teacher_run>/cache/<key>/
        header.json    what the cache holds (see ``CacheSpec``), shapes, byte sizes, sha256 of
                       each data file, and a sha256 of the header itself
        logits.f16     float16, shape (N * k, C), row i * k + j = image i, view j
        views.i16      int16, shape (N, k, 3): the (flip, dx, dy) of every view, for checking

``key`` is a hash of the ``CacheSpec``: the teacher's weights file (``file_digest``), its
model and input size, the dataset, split, ``train_samples`` subset and a digest of the images
themselves, the view spec, ``k``, the bank seed and the format version. Changing any of them
gives another key, so another cache. A cache directory is only ever read after its header,
header checksum, file sizes, data checksums and view table all check out; otherwise it is
rebuilt. It is written into a temporary directory that is renamed into place, so a reader
never sees a half-written cache; one process builds a key at a time (``.<key>.lock``, see
``cqkd.core.lock``), the others wait for it, and the next builder removes what a killed one
left (``.tmp-<key>-*``, ``.trash-<key>-*``).

The relation to FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022): FKD stores, per image and epoch, the parameters of the random-resized
crop it drew and the teacher's (soft) labels for it, so a later run replays those crops instead
of running the teacher. Random resized crops form an open-ended continuous family, so FKD can
only ever store a sample of them. Our views (flip, integer translation) form a small finite
set, which lets ``k = "all"`` store every view and make the cached run draw views exactly as
fresh augmentation would; with ``k`` below that, the bank plays the role of FKD's stored crops:
a fixed sample of ``k`` views per image that all runs (and all epochs) share.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cqkd.core.io import file_sha256, read_json
from cqkd.core.lock import acquire
from cqkd.core.progress import Progress, say
from cqkd.core.signals import hang_if_asked
from cqkd.errors import CqkdError
from cqkd.views.augment import ViewBank, apply_views, to_float

FORMAT = "cqkd-teacher-cache"


VERSION = 1


BANK_SEED = 0  # fixed, like the split seed: runs with different seeds share one cache


LOGITS_FILE = "logits.f16"


VIEWS_FILE = "views.i16"


HEADER_FILE = "header.json"


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

    def key(self) -> str:
        payload = json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def logits_bytes(self) -> int:
        return self.num_images * self.k * self.num_classes * 2

    @property
    def views_bytes(self) -> int:
        return self.num_images * self.k * 3 * 2


def tensor_digest(x: torch.Tensor) -> str:
    """sha256 (16 hex digits) of a tensor's bytes, with its dtype and shape."""
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    h.update(x.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _header_checksum(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """An opened, verified cache: ``lookup(index, which)`` gives the teacher's logits."""

    def __init__(self, path: Path, spec: CacheSpec, header: dict) -> None:
        self.path = path
        self.spec = spec
        self.header = header
        self.logits = np.memmap(path / LOGITS_FILE, dtype="<f2", mode="r",
                                shape=(spec.num_images * spec.k, spec.num_classes))

    @classmethod
    def open(cls, path: Path, spec: CacheSpec, bank: ViewBank) -> "TeacherCache":
        """Open the cache in ``path`` after checking every part of it; raise CacheInvalid if any
        check fails (nothing of an invalid cache is returned)."""
        header_file = path / HEADER_FILE
        if not header_file.is_file():
            raise CacheInvalid("no header")
        try:
            header = read_json(header_file)
        except CqkdError as e:
            raise CacheInvalid(f"unreadable header ({e})") from None
        if header.get("format") != FORMAT:
            raise CacheInvalid("not a cqkd teacher cache header")
        if header.get("header_sha256") != _header_checksum(header):
            raise CacheInvalid("header checksum mismatch")
        if header.get("version") != VERSION:
            raise CacheInvalid(f"format version {header.get('version')} (expected {VERSION})")
        if header.get("spec") != asdict(spec) or header.get("key") != spec.key():
            raise CacheInvalid("header describes another cache")
        for name, expected in ((LOGITS_FILE, spec.logits_bytes), (VIEWS_FILE, spec.views_bytes)):
            f = path / name
            size = f.stat().st_size if f.is_file() else -1
            if size != expected or header.get("bytes", {}).get(name) != expected:
                raise CacheInvalid(f"{name} has {size} bytes, expected {expected} (truncated?)")
            if file_sha256(f) != header.get("sha256", {}).get(name):
                raise CacheInvalid(f"{name} checksum mismatch (corrupt)")
        views = np.fromfile(path / VIEWS_FILE, dtype="<i2").reshape(spec.num_images, spec.k, 3)
        if not torch.equal(torch.from_numpy(views.astype(np.int64)), bank.all_params()):
            raise CacheInvalid("stored views differ from the view bank")
        return cls(path, spec, header)

    def lookup(self, index: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """float32 logits (n, C) of view ``which[i]`` of image ``index[i]`` (on CPU)."""
        rows = index.cpu().numpy().astype(np.int64) * self.spec.k + which.cpu().numpy()
        return torch.from_numpy(self.logits[rows].astype(np.float32))


def build(root: Path, spec: CacheSpec, bank: ViewBank, images: torch.Tensor,
          forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
          batch_size: int = 1024, progress: bool = True) -> Path:
    """Run ``forward`` (float views in [0, 1] -> logits) on every view of every image and write
    the cache directory ``root / spec.key()`` atomically. Returns its path."""
    if len(images) != spec.num_images or bank.k != spec.k:
        raise CqkdError("internal error: cache spec does not match the images or the view bank")
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.key()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{spec.key()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like the run directory
    try:
        k = spec.k
        out = np.memmap(tmp / LOGITS_FILE, dtype="<f2", mode="w+", shape=(spec.num_images * k, spec.num_classes))
        params = bank.all_params()
        per_batch = max(1, batch_size // k)
        bar = Progress(spec.num_images * k, f"teacher cache ({spec.num_images} images x {k} views)", "views", progress)
        with bar, torch.no_grad():
            for start in range(0, spec.num_images, per_batch):
                stop = min(spec.num_images, start + per_batch)
                x = images[start:stop].to(device).repeat_interleave(k, dim=0)
                x = to_float(apply_views(x, params[start:stop].reshape(-1, 3)))
                z = forward(x).float()
                if z.shape != (len(x), spec.num_classes):
                    raise CqkdError(f"the teacher returned logits of shape {tuple(z.shape)}, "
                                    f"expected ({len(x)}, {spec.num_classes})")
                out[start * k:stop * k] = z.cpu().numpy().astype("<f2")
                bar.update(len(x))
                hang_if_asked("cache")
        out.flush()
        del out
        params.to(torch.int16).numpy().astype("<i2").tofile(tmp / VIEWS_FILE)
        header = {
            "format": FORMAT, "version": VERSION, "key": spec.key(), "spec": asdict(spec),
            "logits": {"file": LOGITS_FILE, "dtype": "float16", "shape": [spec.num_images * k, spec.num_classes]},
            "views_table": {"file": VIEWS_FILE, "dtype": "int16", "shape": [spec.num_images, k, 3]},
            "bytes": {LOGITS_FILE: spec.logits_bytes, VIEWS_FILE: spec.views_bytes},
            "sha256": {LOGITS_FILE: file_sha256(tmp / LOGITS_FILE), VIEWS_FILE: file_sha256(tmp / VIEWS_FILE)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        header["header_sha256"] = _header_checksum(header)
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        for name in (LOGITS_FILE, VIEWS_FILE, HEADER_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():
            try:  # another process may have finished the same build meanwhile: keep theirs
                TeacherCache.open(final, spec, bank)
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            except CacheInvalid:
                _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process renamed its (identical) build into place first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _discard(path: Path) -> None:
    """Remove a cache directory without a reader ever seeing it half-deleted."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def open_or_build(root: Path, spec: CacheSpec, bank: ViewBank, images: torch.Tensor,
                  forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                  batch_size: int = 1024, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[TeacherCache, float]:
    """Open the cache for ``spec`` under ``root``, building it first if it is missing or
    invalid. Returns the cache and the build time in seconds (0 when it was reused)."""
    log = log or _log
    path = root / spec.key()
    if path.exists():
        try:
            return TeacherCache.open(path, spec, bank), 0.0
        except CacheInvalid:
            pass
    root.mkdir(parents=True, exist_ok=True)
    with acquire(root / f".{spec.key()}.lock", f"the teacher cache {path}", wait=True):
        remove_stale(root)
        if path.exists():
            try:  # built by another process while we waited
                return TeacherCache.open(path, spec, bank), 0.0
            except CacheInvalid as e:
                log(f"teacher cache {path} is invalid ({e}); rebuilding it")
                _discard(path)
        start = time.perf_counter()
        path = build(root, spec, bank, images, forward, device, batch_size, progress)
        elapsed = time.perf_counter() - start
    try:
        return TeacherCache.open(path, spec, bank), elapsed
    except CacheInvalid as e:  # only if the disk lies to us
        raise CqkdError(f"the teacher cache just built in {path} does not verify ({e})") from None


def remove_stale(root: Path) -> None:
    """Remove the temporary and trash directories that killed builders left under ``root`` (those
    whose key's lock no live process holds)."""
    for d in sorted(root.glob(".tmp-*")) + sorted(root.glob(".trash-*")):
        key = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if not key or not d.is_dir() or d.is_symlink():
            continue
        try:
            with acquire(root / f".{key}.lock", f"the teacher cache {root / key}"):
                shutil.rmtree(d, ignore_errors=True)
        except (CqkdError, OSError):
            continue  # its builder is alive


def wait_for(root: Path, spec: CacheSpec, bank: ViewBank, timeout_s: float = 24 * 3600,
             poll_s: float = 2.0) -> TeacherCache:
    """Wait until another process (rank 0) has built the cache, then open it."""
    path = root / spec.key()
    deadline = time.monotonic() + timeout_s
    while True:
        if path.exists():
            try:
                return TeacherCache.open(path, spec, bank)
            except CacheInvalid:
                pass  # being replaced right now, or rank 0 will rebuild it
        if time.monotonic() > deadline:
            raise CqkdError(f"timed out after {timeout_s:.0f} s waiting for rank 0 to build the teacher cache "
                            f"{path} (is the teacher run directory on a file system every node shares?)")
        time.sleep(poll_s)


def _log(message: str) -> None:
    say(f"cqkd: {message}")
