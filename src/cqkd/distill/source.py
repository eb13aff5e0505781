"""Where a distillation step gets its views and the teacher's logits on them (online or cached).

``TeacherSource(x, index, generator, which) -> (x_hr, z_t)``. In-memory datasets: draw one of
each image's ``k`` bank views from the step generator and apply it. Image folders: the loader
already cut bank region ``which`` of each image (or a fresh crop, without a bank). ``z_t`` comes
from the teacher (``online``) or from the teacher cache; both give the same loss at every step,
up to the float16 rounding of the cache. When ``teacher_cache="auto"`` uses the cache, and why
not otherwise, is in docs/performance.md; ``describe()`` records it in metrics.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cqkd.core.config import RunConfig
from cqkd.data.folder import FolderSplit
from cqkd.data.registry import ImageData
from cqkd.distill import cache as cache_lib
from cqkd.distill import cache_build
from cqkd.distill.targets import topk_logits
from cqkd.errors import CqkdError
from cqkd.nets.teacher import Teacher
from cqkd.views.augment import BANK_SEED, ViewBank, ViewSpec, apply_views, to_float
from cqkd.views.regions import REGIONS_FILE, SIZES_FILE, RegionBank

MAX_CACHE_BYTES = 8 << 30  # the default of make_teacher_source's max_cache_bytes (CQKD_MAX_CACHE_BYTES)

CACHE_PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")  # the build runs under the run's autocast


Bank = ViewBank | RegionBank


class TeacherSource:
    """Views from a per-image bank (or the loader) and the teacher's logits on them (online or cached)."""

    def __init__(self, bank: Bank | None, mode: str, reason: str, spec: cache_lib.CacheSpec | None = None,
                 root: Path | None = None, produce: cache_lib.Produce | None = None, topk: int | None = None,
                 split: FolderSplit | None = None) -> None:
        self.bank = bank
        self.requested = mode  # "off" or "auto"
        self.use_cache = spec is not None
        self.reason = reason
        self.spec, self.root, self.produce = spec, root, produce
        self.topk = topk
        self.split = split  # an image folder's training split: its workers replay the cached regions
        self.cache: cache_lib.TeacherCache | None = None
        self.forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.build_s = 0.0
        self.built = False

    # ---------------------------------------------------------------- the step
    def __call__(self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator,
                 which: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.bank, ViewBank):
            which = self.bank.draw(len(index), generator)
            x = apply_views(x, self.bank.params(index, which))
        x_hr = to_float(x)
        if self.cache is not None:
            return x_hr, self.cache.lookup(index, which).to(x_hr.device, non_blocking=True)
        z_t = self.forward(x_hr)
        return x_hr, (topk_logits(z_t, self.topk) if self.topk else z_t)

    # ---------------------------------------------------------------- set-up
    def prepare(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                progress: bool = True, chunk_views: int = cache_lib.CHUNK_VIEWS) -> None:
        """Take the teacher's forward function and open the cache, building it first where needed:
        every rank builds its share of the chunks, global rank 0 assembles them, the others poll
        the file system until the cache is there (a collective would time out during a long
        build), then everyone meets at ``barrier``."""
        self.forward = forward
        if not self.use_cache or self.cache is not None:
            return
        assert self.spec is not None and self.root is not None and self.produce is not None
        if rank == 0:
            try:
                self.cache, build_s = cache_build.open_or_build(
                    self.root, self.spec, self.bank, self.produce, forward, device, chunk_views, progress)
            except OSError as e:  # e.g. a read-only teacher run directory
                if world_size > 1:
                    raise CqkdError(f"cannot write the teacher cache under {self.root} ({e}); "
                                    "pass --teacher-cache off") from None
                self.use_cache, self.reason = False, f"cache not writable ({e.strerror or e}); teacher online"
                cache_lib._log(self.reason)
            else:
                self.built, self.build_s = build_s > 0, round(build_s, 2)
        else:
            try:
                self.cache = cache_lib.TeacherCache.open(self.root / self.spec.key(), self.spec, self.bank)
            except cache_lib.CacheInvalid:  # missing or damaged: build this rank's share, then wait for rank 0
                cache_build.build(self.root, self.spec, self.bank, self.produce, forward, device, chunk_views,
                                progress, rank, world_size)
                self.cache = cache_build.wait_for(self.root, self.spec, self.bank)
        if barrier is not None and world_size > 1:
            barrier()
        if self.split is not None and self.cache is not None:
            self.split.replay(self.cache.path)
        self.produce = None  # not needed any more

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the teacher source."""
        out: dict[str, Any] = {
            "teacher_cache": self.requested,
            "teacher_source": "cache" if self.cache is not None else "online",
            "teacher_source_reason": self.reason,
            "views_per_image": self.bank.k if self.bank is not None else "all",
            "view_bank_seed": self.bank.seed if self.bank is not None else None,
            "teacher_cache_build_s": self.build_s,
            "teacher_cache_built": self.built,
            "teacher_topk": self.topk,
        }
        if self.cache is not None:
            out["teacher_cache_dir"] = str(self.cache.path)
            if self.topk:
                out["teacher_topk_error"] = self.cache.quality()
        return out


def memory_views(images: torch.Tensor, bank: ViewBank, batch_views: int) -> cache_lib.Produce:
    """The cache build's views of in-memory images: every bank view, ``batch_views`` per batch."""
    params = bank.all_params()

    def produce(start: int, stop: int) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        per = max(1, batch_views // bank.k)
        for s in range(start, stop, per):
            e = min(stop, s + per)
            x = images[s:e].repeat_interleave(bank.k, dim=0)
            yield apply_views(x, params[s:e].reshape(-1, 3)), {cache_lib.VIEWS_FILE: params[s:e].numpy().astype("<i2")}
    return produce


class _BankViews(torch.utils.data.Dataset):
    """Image ``i`` of a folder split -> all its bank crops, their regions and its size (decoded in a worker)."""

    def __init__(self, split: FolderSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.bank_views(i)


def folder_views(split: FolderSplit, batch_views: int, num_workers: int) -> cache_lib.Produce:
    """The cache build's views of an image folder: every bank region, decoded in DataLoader workers."""
    k = split.regions.k

    def produce(start: int, stop: int) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        loader = DataLoader(_BankViews(split), batch_size=max(1, batch_views // k), sampler=range(start, stop),
                            num_workers=num_workers)
        for crops, regions, sizes in loader:
            yield crops.flatten(0, 1), {REGIONS_FILE: regions.numpy(), SIZES_FILE: sizes.numpy()}
    return produce


def make_teacher_source(cfg: RunConfig, teacher: Teacher, train: ImageData | FolderSplit, num_classes: int,
                        bank: ViewBank | None = None, online_reason: str = "",
                        max_cache_bytes: int | None = None) -> TeacherSource:
    """The teacher source for a distillation run (nothing is built or read yet).

    ``bank``: the in-memory split's view bank (the training module builds it once);
    ``online_reason``: why the teacher must run online (a method needs its features);
    ``max_cache_bytes``: the largest cache (default: $CQKD_MAX_CACHE_BYTES or 8 GiB)."""
    if max_cache_bytes is None:
        max_cache_bytes = int(os.environ.get("CQKD_MAX_CACHE_BYTES", MAX_CACHE_BYTES))
    topk = cfg.teacher_topk if cfg.teacher_topk and cfg.teacher_topk < num_classes else None
    if topk and num_classes > np.iinfo(np.int16).max:
        raise CqkdError(f"--teacher-topk stores class indices as int16: at most 32767 classes, not {num_classes}")
    if isinstance(train, FolderSplit):
        bank = train.regions
        views = bank.spec.spec() if bank is not None else ""
    else:
        if bank is None:
            bank = ViewBank(ViewSpec.parse(cfg.augment), len(train), cfg.views_per_image, BANK_SEED)
        views = bank.spec.spec()

    def online(reason: str) -> TeacherSource:
        return TeacherSource(bank, cfg.teacher_cache, reason, topk=topk)

    if online_reason:
        return online(online_reason)
    if cfg.teacher_cache == "off":
        return online("teacher_cache=off")
    if bank is None:
        return online("the loader draws fresh random crops (views_per_image=all): nothing to cache; teacher online")
    precision = str(cfg.precision)
    if precision not in CACHE_PRECISIONS:
        return online(f"precision {precision} is not cached; teacher online")
    if not Path(teacher.path).is_dir():  # a weights file or pretrained weights: no run directory
        return online("the teacher is not a run directory (no place for a cache); teacher online")
    folder = isinstance(train, FolderSplit)
    spec = cache_lib.CacheSpec(
        teacher_digest=teacher.digest, teacher_model=teacher.model_name, teacher_input_size=teacher.input_size,
        dataset=cfg.dataset, split="train", train_samples=cfg.train_samples,
        data_digest=train.digest() if folder else cache_lib.tensor_digest(train.images),
        num_images=len(train), num_classes=num_classes, views=views, k=bank.k, bank_seed=bank.seed,
        topk=topk, teacher_precision="32" if precision in ("32", "32-true") else precision,
    )
    if spec.logits_bytes > max_cache_bytes:
        hint = "" if topk else "; --teacher-topk stores less"
        return online(f"cache would take {spec.logits_bytes / 2**30:.1f} GiB (> CQKD_MAX_CACHE_BYTES){hint}; "
                      "teacher online")
    produce = (folder_views(train, cfg.batch_size, cfg.num_workers) if folder
               else memory_views(train.images, bank, cfg.batch_size))
    return TeacherSource(bank, cfg.teacher_cache, "cached: the teacher's outputs on the bank views", spec,
                         Path(teacher.path) / "cache", produce, topk, train if folder else None)
