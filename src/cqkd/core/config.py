"""Run configuration: one dataclass, validated at the edge, saved with every run.

A ``RunConfig`` holds everything needed to rerun a training or distillation run. The CLI and
the sweep YAML build it with ``RunConfig.from_dict``, which rejects unknown keys, wrong types
and out-of-range values with an error naming the key and the value.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cqkd.errors import CqkdError, check_keys
from cqkd.views.augment import ViewSpec
from cqkd.views.degrade import Degradation

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
TEACHER_CALIBRATION = ("none", "temperature")
TEACHER_CACHE = ("auto", "off")
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "64", "64-true")
RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest")
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # metrics.csv is always written; the others are trackers
GROUPS = ("data and views", "model and optimisation", "distillation", "hardware (passed to Lightning)", "output")


def option(default: Any, help: str, group: str, *, metavar: str | None = None, choices: tuple[str, ...] | None = None,
           distill: bool = False, cli: bool = True) -> Any:
    """A config field that also declares its command-line option (``cqkd.cli`` builds the parser from these)."""
    meta = {"help": help, "group": group, "metavar": metavar, "choices": choices, "distill": distill, "cli": cli}
    return field(default=default, metadata=meta)


D, M, K, H, O = GROUPS
LATE_FIELDS: frozenset[str] = frozenset({"teacher_topk", "teacher_compile", "method", "channels_last"})  # added since the study's runs (see RunConfig.digest)
MAX_SEED = 2**32 - 1  # what numpy and Lightning's seed_everything accept
T_MIN, T_MAX = 1e-2, 1e2  # the temperatures the T_cal fitter searches; T is held to the same range, so that
# T * T_cal and T**2 (the loss) stay within [1e-4, 1e4]: finite in float32 and far from its underflow
MAX_COUNT = 2**31 - 1  # a bound for counts (epochs, steps, images, ...) that every library can index
MAX_BINS = 100_000
MAX_CROP = 8192


@dataclass
class RunConfig:
    """Everything needed to rerun a training or distillation run; each field is also a CLI option."""

    kind: str = option("train", "train (supervised) or distill", D, cli=False)
    dataset: str = option("fashion-mnist", "dataset name: fashion-mnist, cifar10, cifar100, imagefolder, synthetic", D)
    data_dir: str | None = option(None, "a local copy of the dataset (else the system copy or a download)", D)
    train_samples: int | None = option(None, "train on a fixed class-balanced subset of N images", D, metavar="N")
    model: str = option("cnn-small", "model name (see `cqkd models`)", M)
    size: int = option(28, "the student's input side length in px: images are resized to SxS", D, metavar="S")
    resize_mode: str = option("bilinear", "resize interpolation", D, choices=RESIZE_MODES)
    degradation: str | None = option(None, "full degradation spec, e.g. 'size=7,mode=bicubic,blur=0.5,noise=0.02,"
                                           "jpeg=25,upsample=true'; jpeg=LO-HI draws a quality per image "
                                           "(overrides --size and --resize-mode)", D, metavar="SPEC")
    augment: str = option("flip,translate=2", "training views: 'flip,translate=N' or 'none'", D, metavar="SPEC")
    crop_size: int = option(224, "imagefolder: side of the random-resized (train) and center (eval) crop = the "
                                 "teacher's input", D, metavar="S")
    val_size: int | None = option(None, "images held out of train as the val split (default: the dataset's)", D,
                                  metavar="N")
    skip_bad_images: bool = option(False, "imagefolder: log, skip and count unreadable image files (default: fail "
                                          "naming the file)", D)
    epochs: int = option(10, "passes over the training set", M)
    batch_size: int = option(128, "images per optimizer step", M)
    lr: float = option(1e-3, "peak learning rate", M)
    weight_decay: float = option(0.01, "decoupled weight decay (AdamW) or L2 (SGD)", M)
    optimizer: str = option("adamw", "optimizer", M, choices=OPTIMIZERS)
    schedule: str = option("onecycle", "learning-rate schedule", M, choices=SCHEDULES)
    seed: int = option(0, "seed of the initialisation, the data order and the views", M)
    label_smoothing: float = option(0.0, "label smoothing of the hard-label cross-entropy (0 = none)", M)
    teacher: str | None = option(None, "run directory of the trained teacher, or a weights file (.pt/.pth/"
                                       ".safetensors state dict) with --teacher-model", K, metavar="RUN_DIR|FILE",
                                 distill=True)
    teacher_model: str | None = option(None, "the teacher's architecture for a weights file or --teacher-weights "
                                             "(resnet50, timm:NAME, ...)", K, metavar="NAME", distill=True)
    teacher_weights: str | None = option(None, "pretrained teacher weights by name: a torchvision enum member "
                                               "(IMAGENET1K_V2, DEFAULT) or a timm tag (pretrained)", K,
                                         metavar="NAME", distill=True)
    temperature: float | str = option(4.0, "distillation temperature T in [0.01, 100], or 'calibrated' for the teacher's T_cal",
                                      K, metavar="T", distill=True)
    alpha: float = option(0.5, "weight of the soft (KL) term in [0, 1]", K, distill=True)
    teacher_calibration: str = option("none", "temperature: divide the teacher's logits by its T_cal (fitted on val) "
                                              "before T", K, choices=TEACHER_CALIBRATION, distill=True)
    teacher_cache: str = option("auto", "auto: read the teacher's outputs from a cache next to the teacher run where "
                                        "that is exact; off: run the teacher every step", K, choices=TEACHER_CACHE,
                                distill=True)
    views_per_image: int | str | None = option(None, "the per-image bank of K training views (or 'all') that every "
                                                     "run draws from; imagefolder: K random-resized crops per image, "
                                                     "all = a fresh crop each time (default: 8 for in-memory distill, "
                                                     "all otherwise); see docs/performance.md", D, metavar="K")
    teacher_topk: int | None = option(None, "distil from the teacher's top-K logits plus the remaining mass shared by "
                                            "the other classes (online and cached alike; the cache then stores "
                                            "K+1 values per view); default: every logit", K, metavar="K",
                                      distill=True)
    method: str = option("kd", "the distillation method and its options, e.g. 'dkd,beta=8' or 'kd,standardize=true' "
                               "(see `cqkd methods`)", K, metavar="SPEC", distill=True)
    teacher_compile: bool = option(False, "run the teacher through torch.compile (a one-off compile time; see "
                                          "docs/performance.md)", K, distill=True)
    channels_last: bool = option(False, "train and test the student in channels-last memory format: faster "
                                        "convolutions and pooling on CPU (docs/performance.md), not bit-identical "
                                        "to the default layout, so it is part of the config digest", M)
    ece_bins: int = option(15, "equal-width bins for ECE", M)
    accelerator: str = option("auto", "cpu, gpu, auto, ...", H)
    devices: int | str = option(1, "number of devices or 'auto'", H)
    strategy: str = option("auto", "auto, ddp, ...", H)
    num_nodes: int = option(1, "number of nodes", H)
    precision: str | int = option("32", "numeric precision", H, choices=PRECISIONS)
    num_workers: int = option(0, "DataLoader workers", H)
    checkpoint_every_n_steps: int = option(200, "write a resumable checkpoint every N optimizer steps, 0 = epoch "
                                                "ends only", O, metavar="N")
    logger: str = option("csv", "where the run logs its curves besides metrics.csv: csv, tensorboard, mlflow, wandb "
                                "(comma-separated or repeated; see docs/trackers.md)", O, metavar="NAMES")
    tracking_uri: str | None = option(None, "mlflow: the tracking server or store (default: mlflow.db in the run's "
                                            "or the sweep's directory)", O, metavar="URI")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> "RunConfig":
        """A validated config from a raw mapping (unknown keys and bad values raise ``CqkdError`` naming ``where``)."""
        hints = typing.get_type_hints(cls)
        check_keys(raw, CONFIG_KEYS, where)
        values = {k: _coerce(k, v, hints[k], where) for k, v in raw.items()}
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (every field)."""
        return asdict(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A validated copy of this config with ``changes`` applied."""
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def digest(self) -> str:
        """A short hash of the settings that determine the result (not hardware/loader knobs).

        Fields added after a release enter the hash only when set away from their default
        (``LATE_FIELDS``), so that runs written before keep their digest."""
        ignore = {"accelerator", "devices", "num_workers", "data_dir", "num_nodes", "strategy",
                  "checkpoint_every_n_steps", "teacher_cache", "teacher_compile", "logger", "tracking_uri"}
        defaults = {f.name: f.default for f in fields(self)}
        payload = {k: v for k, v in self.to_dict().items()
                   if k not in ignore and not (k in LATE_FIELDS and v == defaults[k])}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ validation
    def validate(self, where: str = "config") -> None:
        """Raise ``CqkdError`` naming ``where`` if any setting is out of range or inconsistent."""
        def bad(key: str, why: str) -> CqkdError:
            return CqkdError(f"{where}: {key}={getattr(self, key)!r}: {why}")

        if self.kind not in ("train", "distill"):
            raise bad("kind", "must be 'train' or 'distill'")
        self._check_numbers(bad)
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
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.train_samples is not None and self.train_samples < 1:
            raise bad("train_samples", "must be at least 1")
        if isinstance(self.temperature, str):
            if self.temperature != "calibrated":
                raise bad("temperature", "must be a number > 0 or 'calibrated'")
        elif not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        elif not T_MIN <= self.temperature <= T_MAX:
            raise bad("temperature", f"must be in [{T_MIN:g}, {T_MAX:g}] (the range of T_cal's fit), "
                                     "so that T * T_cal and T squared stay finite in float32")
        if not 0 <= self.alpha <= 1:
            raise bad("alpha", "must be in [0, 1]")
        if self.teacher_calibration not in TEACHER_CALIBRATION:
            raise bad("teacher_calibration", f"must be one of {', '.join(TEACHER_CALIBRATION)}")
        if self.teacher_cache not in TEACHER_CACHE:
            raise bad("teacher_cache", "must be 'off' or 'auto'")
        if self.views_per_image is None:
            self.views_per_image = 8 if self.kind == "distill" and self.dataset != "imagefolder" else "all"
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise bad("teacher_topk", "must be a positive integer (or unset: every logit)")
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
        names = [n.strip() for n in self.logger.split(",")]
        if not all(n in LOGGERS for n in names):
            raise bad("logger", f"must be one or more of {', '.join(LOGGERS)}, comma-separated")
        self.logger = ",".join(dict.fromkeys(["csv", *names]))
        if self.val_size is not None and self.val_size < 1:
            raise bad("val_size", "must be at least 1")
        if self.kind == "distill" and not self.teacher and not self.teacher_weights:
            raise bad("teacher", "a distillation run needs a teacher: a run directory, a weights file "
                                 "(with teacher_model), or teacher_weights (with teacher_model)")
        if self.teacher_weights and self.teacher:
            raise bad("teacher_weights", "give either teacher (a run directory or file) or teacher_weights, not both")
        if self.teacher_weights and not self.teacher_model:
            raise bad("teacher_weights", "needs teacher_model (e.g. resnet50 or timm:resnet50)")
        if not isinstance(self.method, str) or not self.method.strip():
            raise bad("method", "must be a method spec such as 'kd' or 'dkd,beta=8' (see `cqkd methods`)")
        if self.kind == "train" and self.method != "kd":
            raise bad("method", "a distillation method needs a distillation run (cqkd distill)")
        if self.kind == "train" and self.temperature == "calibrated":
            raise bad("temperature", "'calibrated' needs a teacher")
        # parse the specs now so that a bad one fails before any work
        self.degradation_spec()

        ViewSpec.parse(self.augment)

    def _check_numbers(self, bad: Any) -> None:
        """Every number finite, every count within what the libraries below can take."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, "must be a finite number")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_COUNT and f.name != "seed":
                raise bad(f.name, f"must be at most {MAX_COUNT}")
        if not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"must be in [0, {MAX_SEED}]")
        if self.ece_bins > MAX_BINS:
            raise bad("ece_bins", f"must be at most {MAX_BINS}")
        if self.crop_size > MAX_CROP:
            raise bad("crop_size", f"must be at most {MAX_CROP}")
        for key in ("data_dir", "teacher", "teacher_model", "teacher_weights", "degradation", "augment", "method",
                    "tracking_uri"):
            value = getattr(self, key)
            if isinstance(value, str) and ("\x00" in value or len(value) > 4096):
                raise bad(key, "is not a usable path or name (a NUL byte, or longer than 4096 characters)")

    def degradation_spec(self):
        """The run's :class:`Degradation`: parsed from ``degradation`` if set, else ``size`` with ``resize_mode``."""

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
