"""Where a distillation step gets its views and the teacher's logits on them.

``TeacherSource(x, index, generator) -> (x_hr, z_t)``: for a batch of uint8 images ``x`` with
dataset indices ``index``, draw for each sample one of its ``k`` bank views (from the step
generator), apply it, and return the float view ``x_hr`` in [0, 1] and the teacher's logits
``z_t`` on it, either by running the teacher (``online``) or by reading them from the teacher
cache (``cache``). Both modes draw the same views from the same generator, so they give the same
loss at every step, up to the float16 rounding of the cached logits.

``teacher_cache="auto"`` uses the cache where it is exact:

- full 32-bit precision (under mixed precision the online teacher runs under autocast, which
  the cache, computed in float32, would not reproduce);
- an in-memory training split (images that are a fixed function of their index);
- a cache of at most ``MAX_CACHE_BYTES``;
- a writable teacher run directory (or a cache already there).

Otherwise it runs the teacher online; ``describe()`` records which and why in metrics.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cqkd.core.config import RunConfig
from cqkd.data.registry import ImageData
from cqkd.distill import cache as cache_lib
from cqkd.errors import CqkdError
from cqkd.nets.teacher import Teacher
from cqkd.views.augment import ViewBank, ViewSpec, apply_views, to_float

MAX_CACHE_BYTES = int(os.environ.get("CQKD_MAX_CACHE_BYTES", 8 << 30))


EXACT_PRECISIONS = ("32", "32-true")


class TeacherSource:
    """Views from a per-image bank and the teacher's logits on them (online or cached)."""

    def __init__(self, bank: ViewBank, mode: str, reason: str, spec: cache_lib.CacheSpec | None = None,
                 root: Path | None = None, images: torch.Tensor | None = None, batch_size: int = 128) -> None:
        self.bank = bank
        self.requested = mode  # "off" or "auto"
        self.use_cache = spec is not None
        self.reason = reason
        self.spec, self.root, self.images = spec, root, images
        self.batch_size = batch_size  # views per teacher forward while building (the run's batch size)
        self.cache: cache_lib.TeacherCache | None = None
        self.forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.build_s = 0.0
        self.built = False

    # ---------------------------------------------------------------- the step
    def __call__(self, x: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        which = self.bank.draw(len(index), generator)
        x_hr = to_float(apply_views(x, self.bank.params(index, which)))
        if self.cache is not None:
            z_t = self.cache.lookup(index, which).to(x_hr.device, non_blocking=True)
        else:
            z_t = self.forward(x_hr)
        return x_hr, z_t

    # ---------------------------------------------------------------- set-up
    def prepare(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu",
                rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                progress: bool = True) -> None:
        """Take the teacher's forward function and open the cache. Global rank 0 builds it if
        needed; the other ranks poll the file system until it is there (a collective would time
        out during a long build), then everyone meets at ``barrier``."""
        self.forward = forward
        if not self.use_cache or self.cache is not None:
            return
        assert self.spec is not None and self.root is not None and self.images is not None
        if rank == 0:
            try:
                self.cache, build_s = cache_lib.open_or_build(
                    self.root, self.spec, self.bank, self.images, forward, device, self.batch_size, progress)
            except OSError as e:  # e.g. a read-only teacher run directory
                if world_size > 1:
                    raise CqkdError(f"cannot write the teacher cache under {self.root} ({e}); "
                                    "pass --teacher-cache off") from None
                self.use_cache, self.reason = False, f"cache not writable ({e.strerror or e}); teacher online"
                cache_lib._log(self.reason)
            else:
                self.built, self.build_s = build_s > 0, round(build_s, 2)
        else:
            self.cache = cache_lib.wait_for(self.root, self.spec, self.bank)
        if barrier is not None and world_size > 1:
            barrier()
        self.images = None  # not needed any more

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the teacher source."""
        out: dict[str, Any] = {
            "teacher_cache": self.requested,
            "teacher_source": "cache" if self.cache is not None else "online",
            "teacher_source_reason": self.reason,
            "views_per_image": self.bank.k,
            "view_bank_seed": self.bank.seed,
            "teacher_cache_build_s": self.build_s,
            "teacher_cache_built": self.built,
        }
        if self.cache is not None:
            out["teacher_cache_dir"] = str(self.cache.path)
        return out


def make_teacher_source(cfg: RunConfig, teacher: Teacher, train: ImageData, num_classes: int) -> TeacherSource:
    """The teacher source for a distillation run (nothing is built or read yet)."""
    spec_views = ViewSpec.parse(cfg.augment)
    bank = ViewBank(spec_views, len(train), cfg.views_per_image, cache_lib.BANK_SEED)
    mode = cfg.teacher_cache
    if mode == "off":
        return TeacherSource(bank, mode, "teacher_cache=off")
    precision = str(cfg.precision)
    if precision not in EXACT_PRECISIONS:
        return TeacherSource(bank, mode, f"precision {precision} is not exact with a float32 cache; teacher online")
    if not isinstance(train, ImageData):
        return TeacherSource(bank, mode, "training split is not held in memory; teacher online")
    if not Path(teacher.path).is_dir():  # a weights file or pretrained weights: no run directory
        return TeacherSource(bank, mode, "the teacher is not a run directory (no place for a cache); teacher online")
    spec = cache_lib.CacheSpec(
        teacher_digest=teacher.digest, teacher_model=teacher.model_name, teacher_input_size=teacher.input_size,
        dataset=cfg.dataset, split="train", train_samples=cfg.train_samples,
        data_digest=cache_lib.tensor_digest(train.images), num_images=len(train), num_classes=num_classes,
        views=spec_views.spec(), k=bank.k, bank_seed=bank.seed,
    )
    if spec.logits_bytes > MAX_CACHE_BYTES:
        return TeacherSource(bank, mode, f"cache would take {spec.logits_bytes / 2**30:.1f} GiB "
                                         f"(> CQKD_MAX_CACHE_BYTES); teacher online")
    return TeacherSource(bank, mode, "exact: float32 teacher, in-memory split", spec,
                         Path(teacher.path) / "cache", train.images, cfg.batch_size)
