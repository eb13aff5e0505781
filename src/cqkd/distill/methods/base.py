"""The shape of a distillation method: options parsed from a spec string, what it needs, its loss.

A method is one module with one ``Method`` subclass, registered by name in
``cqkd.distill.methods.METHODS``. It knows no trainer, no run directory and no CLI: ``loss`` is a
pure function of the student's and the teacher's outputs (tensors), the labels and the training
progress. How to write one: docs/extending.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cqkd.errors import CqkdError, check_keys, unknown_name


@dataclass(frozen=True)
class Option:
    """A typed method option with its default and range (inclusive unless ``open_low``)."""

    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself is out of range (e.g. a temperature > 0)

    def parse(self, method: str, key: str, text: str) -> Any:
        """The option's value from its text in a spec; ``CqkdError`` naming it if bad."""
        kind = type(self.default)
        where = f"--method {method}: {key}={text!r}"
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise CqkdError(f"{where} must be true or false")
        try:
            value = kind(text) if kind is int else float(text)
        except ValueError:
            raise CqkdError(f"{where} must be {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise CqkdError(f"{where} must be a finite number")
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            raise CqkdError(f"{where} must be {'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None and value > self.high:
            raise CqkdError(f"{where} must be <= {self.high:g}")
        return value

    def describe(self) -> str:
        """The default and range as one short text (for ``cqkd methods``)."""
        lo = "" if self.low is None else f"{'>' if self.open_low else '>='}{self.low:g}"
        hi = "" if self.high is None else f"<={self.high:g}"
        rng = " ".join(x for x in (lo, hi) if x)
        return f"{self.default}" + (f" ({rng})" if rng else "")


@dataclass(frozen=True)
class Needs:
    """What a method asks of the step: teacher logits (cacheable), features at named stages."""

    teacher_logits: bool = True
    features: str = ""  # "" (none), "hint" (the middle stage) or "stages" (every stage)
    full_distribution: bool = False  # the loss needs every class's teacher probability (no --teacher-topk)

    def describe(self, own_parameters: bool) -> str:
        """``logits``, ``features (...)``, ``own parameters``, as one comma-separated text."""
        parts = ["teacher logits" if self.teacher_logits else "no teacher"]
        if self.features:
            parts.append(f"features ({self.features})")
        if own_parameters:
            parts.append("own parameters")
        return ", ".join(parts)


@dataclass
class Outputs:
    """A network's outputs on one batch: logits, and features by stage where a method asked for them.

    For the teacher, ``t_cal`` is its calibration temperature: ``scaled(T)`` is the one place
    where z_t / T_cal is applied, before anything else a method does with the logits.
    """

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)
    t_cal: float = 1.0

    def scaled(self, temperature: float = 1.0) -> torch.Tensor:
        """z / (T_cal · T) in float32."""
        return self.logits.float() / (self.t_cal * temperature)


@dataclass(frozen=True)
class Settings:
    """What a method takes from the run besides its own options (resolved once)."""

    temperature: float = 4.0  # the run's distillation temperature (kd, ctkd's fixed part)
    alpha: float = 0.5  # the run's soft-term weight
    label_smoothing: float = 0.0
    epochs: int = 1
    num_classes: int = 10


@dataclass(frozen=True)
class Progress:
    """Where training is: ``epoch`` counts from 0 and has a fraction within the epoch."""

    epoch: float = 0.0


class Method:
    """A distillation method (subclass it; see docs/extending.md)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    needs: ClassVar[Needs] = Needs()
    logit_method: ClassVar[bool] = True  # takes the ``standardize`` option

    def __init__(self, values: dict[str, Any], settings: Settings) -> None:
        self.opts = values
        self.settings = settings

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> nn.ModuleDict:
        """The method's trainable modules (a regressor, a learned temperature); none by default.

        Called once before training with the shapes of the features ``needs`` asks for."""
        return nn.ModuleDict()

    def loss(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor,
             progress: Progress) -> dict[str, torch.Tensor]:
        """The loss terms by name; ``loss`` is the one that is minimised."""
        raise NotImplementedError

    # ------------------------------------------------------------- helpers for subclasses
    def ce(self, student: Outputs, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the student on the hard labels (the run's label smoothing)."""
        return F.cross_entropy(student.logits.float(), labels, label_smoothing=self.settings.label_smoothing)

    def logits(self, student: Outputs, teacher: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_s, z_t / T_cal) in float32, both z-scored per sample with ``standardize=true``."""
        z_s, z_t = student.logits.float(), teacher.scaled()
        if self.opts.get("standardize"):
            z_s, z_t = standardize(z_s), standardize(z_t)
        return z_s, z_t


STANDARDIZE = Option(False, "z-score each sample's logits before the temperature (Sun et al., CVPR 2024)")


def standardize(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): (z - mean(z)) / (std(z) + eps) per sample.

    ``std`` is the unbiased (n - 1) standard deviation, as in the authors' code. The result is
    invariant to z -> a·z + b (a > 0), so a teacher's calibration temperature has no effect
    on a standardized method."""
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + eps)


def kl_soft(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch mean of KL(softmax(z_t/T) ‖ softmax(z_s/T)) in nats (no T² factor)."""
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def parse_spec(spec: str, registry: dict[str, type[Method]]) -> tuple[type[Method], dict[str, Any]]:
    """(method class, every option's value) from ``name[,key=value]*``; ``CqkdError`` naming the bad part."""
    parts = [p.strip() for p in str(spec).split(",")]
    name = parts[0]
    if name not in registry:
        raise unknown_name("method", name, registry)
    cls = registry[name]
    options = dict(cls.options)
    if cls.logit_method:
        options.setdefault("standardize", STANDARDIZE)
    raw: dict[str, str] = {}
    for part in parts[1:]:
        if "=" not in part:
            raise CqkdError(f"--method {spec!r}: {part!r} must be key=value")
        key, _, text = part.partition("=")
        key = key.strip()
        check_keys([key], options, f"--method {name}")
        if key in raw:
            raise CqkdError(f"--method {spec!r}: {key} given twice")
        raw[key] = text.strip()
    values = {k: (o.parse(name, k, raw[k]) if k in raw else o.default) for k, o in options.items()}
    return cls, values


def match_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N, C, H, W) maps at one spatial size: the larger is average-pooled to the smaller.

    The student sees a degraded (e.g. 7 px) view and the teacher the full view (28 px), so a
    stage's maps differ in size; pooling the larger keeps every cell the mean of the region it
    covers (``adaptive_avg_pool2d``; overlapping windows where the sizes do not divide)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
