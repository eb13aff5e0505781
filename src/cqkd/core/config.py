"""Run configuration: one dataclass, validated at the edge, saved with every run.

A ``RunConfig`` holds everything needed to rerun a training or distillation run. The CLI and
the sweep YAML build it with ``RunConfig.from_dict``, which rejects unknown keys, wrong types
and out-of-range values with an error naming the key and the value.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

from cqkd.errors import CqkdError
from cqkd.views.augment import ViewSpec
from cqkd.views.degrade import Degradation

OPTIMIZERS = ("adamw", "sgd")


TEACHER_CALIBRATION = ("none", "temperature")


PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "64", "64-true")


@dataclass
class RunConfig:
    # what to train
    kind: str = "train"  # "train" (supervised) or "distill"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_samples: int | None = None
    model: str = "cnn-small"
    size: int = 28  # the model's input side length; degradation = resize to this size
    resize_mode: str = "bilinear"
    degradation: str | None = None  # full degradation spec; overrides size/resize_mode when set
    augment: str = "flip,translate=2"
    # image folders (ImageNet layout) and held-out splits
    crop_size: int = 224  # imagefolder: side of the training/eval crop = the teacher's input size
    val_size: int | None = None  # images held out of train as "val" (None: the dataset's default)
    skip_bad_images: bool = False  # imagefolder: log, skip and count unreadable files
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    seed: int = 0
    label_smoothing: float = 0.0  # the hard-label cross-entropy's smoothing (0 = none)
    # distillation
    teacher: str | None = None  # a cqkd run directory, or a weights file (.pt/.pth/.safetensors)
    teacher_model: str | None = None  # the teacher's architecture, for a weights file or pretrained weights
    teacher_weights: str | None = None  # pretrained weights by name, e.g. IMAGENET1K_V2 (torchvision), pretrained (timm)
    temperature: float | str = 4.0  # a number, or "calibrated" (= the teacher's T_cal)
    alpha: float = 0.5
    teacher_calibration: str = "none"
    teacher_cache: str = "auto"  # "auto": reuse stored teacher outputs where exact; "off": always run it
    # the per-image view bank every in-memory run draws its training views from: k views, or "all"
    # (None: 8 for distillation, so that the teacher's outputs can be cached; "all" for supervised)
    views_per_image: int | str | None = None
    # evaluation
    ece_bins: int = 15
    # hardware
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str | int = "32"
    num_workers: int = 0
    # fault tolerance: a resumable checkpoint every N optimizer steps (0 = only at epoch ends)
    checkpoint_every_n_steps: int = 200

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "RunConfig":
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CqkdError(f"{where}: unknown key {unknown[0]!r}{suggestion}")
        values = {k: _coerce(k, v, hints[k], where) for k, v in raw.items()}
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def digest(self) -> str:
        """A short hash of the settings that determine the result (not hardware/loader knobs)."""
        ignore = {"accelerator", "devices", "num_workers", "data_dir", "num_nodes", "strategy",
                  "checkpoint_every_n_steps", "teacher_cache"}
        payload = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ validation
    def validate(self, where: str = "config") -> None:
        def bad(key: str, why: str) -> CqkdError:
            return CqkdError(f"{where}: {key}={getattr(self, key)!r}: {why}")

        if self.kind not in ("train", "distill"):
            raise bad("kind", "must be 'train' or 'distill'")
        if self.size < 1:
            raise bad("size", "must be at least 1")
        if self.epochs < 1:
            raise bad("epochs", "must be at least 1")
        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in ("onecycle", "constant", "cosine"):
            raise bad("schedule", "must be onecycle, constant or cosine")
        if self.train_samples is not None and self.train_samples < 1:
            raise bad("train_samples", "must be at least 1")
        if isinstance(self.temperature, str):
            if self.temperature != "calibrated":
                raise bad("temperature", "must be a number > 0 or 'calibrated'")
        elif not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        if not 0 <= self.alpha <= 1:
            raise bad("alpha", "must be in [0, 1]")
        if self.teacher_calibration not in TEACHER_CALIBRATION:
            raise bad("teacher_calibration", f"must be one of {', '.join(TEACHER_CALIBRATION)}")
        if self.teacher_cache not in ("off", "auto"):
            raise bad("teacher_cache", "must be 'off' or 'auto'")
        if self.views_per_image is None:
            self.views_per_image = 8 if self.kind == "distill" else "all"
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "must be in [0, 1)")
        if isinstance(self.views_per_image, str) and self.views_per_image.strip().isdigit():
            self.views_per_image = int(self.views_per_image)
        if self.views_per_image != "all" and not (isinstance(self.views_per_image, int) and self.views_per_image >= 1):
            raise bad("views_per_image", "must be a positive integer or 'all'")
        if self.ece_bins < 1:
            raise bad("ece_bins", "must be at least 1")
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.num_nodes < 1:
            raise bad("num_nodes", "must be >= 1")
        if self.checkpoint_every_n_steps < 0:
            raise bad("checkpoint_every_n_steps", "must be >= 0 (0 = checkpoint at epoch ends only)")
        if self.crop_size < 1:
            raise bad("crop_size", "must be at least 1")
        if self.val_size is not None and self.val_size < 1:
            raise bad("val_size", "must be at least 1")
        if self.kind == "distill" and not self.teacher and not self.teacher_weights:
            raise bad("teacher", "a distillation run needs a teacher: a run directory, a weights file "
                                 "(with teacher_model), or teacher_weights (with teacher_model)")
        if self.teacher_weights and self.teacher:
            raise bad("teacher_weights", "give either teacher (a run directory or file) or teacher_weights, not both")
        if self.teacher_weights and not self.teacher_model:
            raise bad("teacher_weights", "needs teacher_model (e.g. resnet50 or timm:resnet50)")
        if self.kind == "train" and self.temperature == "calibrated":
            raise bad("temperature", "'calibrated' needs a teacher")
        # parse the specs now so that a bad one fails before any work
        self.degradation_spec()

        ViewSpec.parse(self.augment)

    def degradation_spec(self):

        if self.degradation:
            return Degradation.parse(self.degradation)
        return Degradation(size=self.size, mode=self.resize_mode)


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check and convert a raw (YAML/CLI) value to the field's annotated type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise CqkdError(f"{where}: {key} must not be empty")
    if isinstance(value, str) and float in options:
        try:
            return float(value)
        except ValueError:
            pass
    for t in options:
        if t is type(None):
            continue
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    # strings from the command line: try numbers in the order of the annotation
    if isinstance(value, str):
        for t in options:
            if t in (int, float):
                try:
                    return t(value)
                except ValueError:
                    pass
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options if t is not type(None))
    raise CqkdError(f"{where}: {key}={value!r} has the wrong type (expected {names})")


CONFIG_KEYS = tuple(f.name for f in fields(RunConfig))  # every key a run config, CLI or sweep accepts
