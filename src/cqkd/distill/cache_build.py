"""Building the teacher cache (``cqkd.distill.cache``): resumable chunks, assembled and verified;
opening it or building it once per key (a lock per key; the others wait), and cleaning up what a
killed builder left."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cqkd.core import faults
from cqkd.core.io import atomic_write, file_sha256, refuse_symlink
from cqkd.core.lock import acquire
from cqkd.core.progress import Progress
from cqkd.distill.cache import (
    CHUNK_VIEWS,
    FORMAT,
    HEADER_FILE,
    LOGITS_FILE,
    TOPK_INDEX_FILE,
    TOPK_LOGITS_FILE,
    VERSION,
    CacheInvalid,
    CacheSpec,
    Produce,
    TeacherCache,
    _header_checksum,
    _log,
)
from cqkd.distill.targets import KL_TEMPERATURES, kl_to_full, topk_decode, topk_encode
from cqkd.errors import CqkdError
from cqkd.views.augment import ViewBank, to_float
from cqkd.views.regions import RegionBank


def _chunk_path(partial: Path, c: int) -> Path:
    return partial / f"chunk-{c:06d}.npz"


def _build_chunk(spec: CacheSpec, produce: Produce, forward: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str, start: int, stop: int, bar: Progress) -> dict[str, np.ndarray]:
    """The arrays of images ``start..stop-1``: targets, view tables and the top-k error sums."""
    parts: dict[str, list[np.ndarray]] = {}
    kl_sum, kl_max, kept = np.zeros(len(KL_TEMPERATURES)), np.zeros(len(KL_TEMPERATURES)), 0.0
    for views, tables in produce(start, stop):
        z = forward(to_float(views.to(device))).float()
        if z.shape != (len(views), spec.num_classes):
            raise CqkdError(f"the teacher returned logits of shape {tuple(z.shape)}, "
                            f"expected ({len(views)}, {spec.num_classes})")
        if spec.topk is None:
            parts.setdefault(LOGITS_FILE, []).append(z.cpu().numpy().astype("<f2"))
        else:
            index, values = topk_encode(z, spec.topk)
            values = values.half()
            parts.setdefault(TOPK_INDEX_FILE, []).append(index.cpu().numpy().astype("<i2"))
            parts.setdefault(TOPK_LOGITS_FILE, []).append(values.cpu().numpy())
            z_hat = topk_decode(index, values.float(), spec.num_classes)
            for t, temperature in enumerate(KL_TEMPERATURES):
                kl = kl_to_full(z, z_hat, temperature)
                kl_sum[t] += float(kl.sum())
                kl_max[t] = max(kl_max[t], float(kl.max()))
            kept += float(torch.softmax(z.double(), 1).gather(1, index).sum())
        for name, table in tables.items():
            parts.setdefault(name, []).append(np.asarray(table))
        bar.update(len(views))
        faults.point("cache")
    arrays = {name: np.concatenate(v) for name, v in parts.items()}
    arrays.update(_kl_sum=kl_sum, _kl_max=kl_max, _kept_mass=np.array([kept]))
    return arrays


def _load_chunk(partial: Path, c: int, spec: CacheSpec, start: int, stop: int) -> dict[str, np.ndarray] | None:
    """A finished chunk's arrays, or None (and the file removed) when it is missing or damaged."""
    path = _chunk_path(partial, c)
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        path.unlink(missing_ok=True)
        return None
    n = stop - start
    for name, (_, shape) in spec.files().items():
        rows = n * spec.k if shape[0] == spec.num_images * spec.k else n
        if name not in arrays or arrays[name].shape != (rows, *shape[1:]):
            path.unlink(missing_ok=True)
            return None
    return arrays


def build(root: Path, spec: CacheSpec, bank: ViewBank | RegionBank, produce: Produce,
          forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
          chunk_views: int = CHUNK_VIEWS, progress: bool = True, rank: int = 0, world_size: int = 1,
          timeout_s: float = 24 * 3600) -> Path:
    """Run ``forward`` (float views in [0, 1] -> logits) on every view and write the cache
    ``root / spec.key()``. Work is saved in chunks under ``root / .build-<key>``, so an interrupted
    build resumes where it stopped; with ``world_size`` ranks each builds every world_size-th
    chunk and rank 0 assembles them (the others return at once). Returns the cache's path."""
    partial = root / f".build-{spec.key()}"
    partial.mkdir(parents=True, exist_ok=True)
    per = spec.chunk_images(chunk_views)
    bounds = [(s, min(spec.num_images, s + per)) for s in range(0, spec.num_images, per)]
    mine = [c for c in range(len(bounds)) if c % world_size == rank]
    bar = Progress(sum(bounds[c][1] - bounds[c][0] for c in mine) * spec.k,
                   f"teacher cache ({spec.num_images} images x {spec.k} views)", "views", progress)

    def make(c: int) -> None:
        arrays = _build_chunk(spec, produce, forward, device, *bounds[c], bar)
        atomic_write(_chunk_path(partial, c), lambda f: np.savez(f, **arrays), mode="wb")

    with bar, torch.inference_mode():
        for c in mine:
            if _chunk_path(partial, c).is_file():
                bar.update((bounds[c][1] - bounds[c][0]) * spec.k)  # done before an interruption
            else:
                make(c)
        if rank != 0:
            return root / spec.key()
        deadline = time.monotonic() + timeout_s
        while True:
            if _valid(root / spec.key(), spec, bank):  # another process finished this build meanwhile
                return root / spec.key()
            missing = [c for c in range(len(bounds)) if not _chunk_path(partial, c).is_file()]
            if missing and world_size > 1 and time.monotonic() < deadline:
                time.sleep(2.0)  # the other ranks' chunks
                continue
            for c in missing:  # damaged ones (removed below), or those of ranks that gave up
                make(c)
            try:
                return _assemble(root, spec, bank, partial, bounds)
            except _DamagedChunk:
                continue


def _valid(path: Path, spec: CacheSpec, bank: ViewBank | RegionBank) -> bool:
    if not path.exists():
        return False
    try:
        TeacherCache.open(path, spec, bank)
    except CacheInvalid:
        return False
    return True


class _DamagedChunk(Exception):
    """A chunk file that did not load (it has been removed, to be built again)."""


def _assemble(root: Path, spec: CacheSpec, bank: ViewBank | RegionBank, partial: Path,
              bounds: list[tuple[int, int]]) -> Path:
    """Write the chunks as one cache directory, atomically renamed into place; remove the chunks."""
    final = root / spec.key()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{spec.key()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like the run directory
    try:
        files = spec.files()
        handles = {name: open(tmp / name, "wb") for name in files}
        stats: list[dict[str, np.ndarray]] = []
        try:
            for c, (start, stop) in enumerate(bounds):
                arrays = _load_chunk(partial, c, spec, start, stop)
                if arrays is None:
                    raise _DamagedChunk(c)
                for name, (dtype, _) in files.items():
                    handles[name].write(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes())
                stats.append({k: v for k, v in arrays.items() if k.startswith("_")})
        finally:
            for f in handles.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        header = {
            "format": FORMAT, "version": VERSION, "key": spec.key(), "spec": spec.fields(),
            "files": {name: {"dtype": d, "shape": list(s)} for name, (d, s) in files.items()},
            "bytes": {name: spec.file_bytes(name) for name in files},
            "sha256": {name: file_sha256(tmp / name) for name in files},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if spec.topk is not None:
            header["topk_error"] = _topk_error(spec, stats)
        header["header_sha256"] = _header_checksum(header)
        atomic_write(tmp / HEADER_FILE, lambda f: f.write(json.dumps(header, indent=2, sort_keys=True) + "\n"))
        if _valid(final, spec, bank):  # another process finished the same build meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
            return final
        _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its (identical) build into place first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _topk_error(spec: CacheSpec, chunks: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Mean and max KL(full || top-k) over all views at each of ``KL_TEMPERATURES``, and the kept mass."""
    rows = spec.num_images * spec.k
    kl_sum = sum(a["_kl_sum"] for a in chunks)
    kl_max = np.max([a["_kl_max"] for a in chunks], axis=0)
    return {"k": spec.topk, "temperatures": list(KL_TEMPERATURES),
            "mean_kl": [float(v) / rows for v in kl_sum], "max_kl": [float(v) for v in kl_max],
            "mean_kept_mass": float(sum(a["_kept_mass"][0] for a in chunks)) / rows}


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


def open_or_build(root: Path, spec: CacheSpec, bank: ViewBank | RegionBank, produce: Produce,
                  forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                  chunk_views: int = CHUNK_VIEWS, progress: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[TeacherCache, float]:
    """Open the cache for ``spec`` under ``root``, building it first if it is missing or
    invalid. Returns the cache and the build time in seconds (0 when it was reused)."""
    log = log or _log
    refuse_symlink(root)  # a symlinked cache/ would take the build and its cleanup out of the teacher run
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
        path = build(root, spec, bank, produce, forward, device, chunk_views, progress)
        elapsed = time.perf_counter() - start
    try:
        return TeacherCache.open(path, spec, bank), elapsed
    except CacheInvalid as e:  # only if the disk lies to us
        raise CqkdError(f"the teacher cache just built in {path} does not verify ({e})") from None


def remove_stale(root: Path) -> None:
    """Remove the temporary and trash directories that killed builders left under ``root`` (those
    whose key's lock no live process holds); nothing when ``root`` is a symbolic link."""
    if root.is_symlink():
        return
    for d in sorted(root.glob(".tmp-*")) + sorted(root.glob(".trash-*")):
        key = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
        if not key or not d.is_dir() or d.is_symlink():
            continue
        try:
            with acquire(root / f".{key}.lock", f"the teacher cache {root / key}"):
                shutil.rmtree(d, ignore_errors=True)
        except (CqkdError, OSError):
            continue  # its builder is alive


def wait_for(root: Path, spec: CacheSpec, bank: ViewBank | RegionBank, timeout_s: float = 24 * 3600,
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


