"""Loading a trained teacher from its run directory, frozen and ready for distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from cqkd.data import DatasetInfo
from cqkd.errors import CqkdError
from cqkd.models import build_model
from cqkd.runs import RunDir


@dataclass
class Teacher:
    """A frozen teacher network and what the student's run needs to know about it."""

    model: nn.Module
    path: str
    model_name: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # the temperature its logits are divided by (T_cal when calibrated)
    t_cal: float | None = None  # the fitted calibration temperature, where one was asked for
    digest: str = ""


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``model`` (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CqkdError(f"{path} is corrupt or not a safetensors file ({e})") from None
    expected = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        k, got, want = wrong[-1]  # the last one is usually the classifier
        raise CqkdError(f"{path} does not match the model: {k} has shape {list(got)}, the model needs {list(want)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CqkdError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _check_classes(weights: Path, model: nn.Module, path: str, info: DatasetInfo) -> None:
    """Name the class-count mismatch plainly: the classifier is the last weight matrix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CqkdError(f"{weights} is corrupt or not a safetensors file ({e})") from None
    matrices = [k for k, v in model.state_dict().items() if v.ndim == 2]
    if matrices and matrices[-1] in shapes and len(shapes[matrices[-1]]) == 2:
        n = shapes[matrices[-1]][0]
        if n != info.num_classes:
            raise CqkdError(f"teacher {path!r} predicts {n} classes but dataset {info.name!r} has "
                            f"{info.num_classes}; distil from a teacher trained on the same classes")


def load_teacher(path: str, info: DatasetInfo) -> Teacher:
    """Build the teacher of run directory ``path`` for dataset ``info``, frozen, in eval mode."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise CqkdError(f"--teacher {path!r} is not a directory")
    cfg = run.config()
    weights = run.require_weights()
    if cfg.dataset != info.name:
        raise CqkdError(f"teacher {path!r} was trained on {cfg.dataset!r}, not {info.name!r}")
    input_size = cfg.degradation_spec().output_size(info.image_size)
    model = build_model(cfg.model, info.num_classes, info.channels, input_size)
    _check_classes(weights, model, path, info)
    try:
        load_weights(model, weights)
    except CqkdError as e:
        if "does not match" in str(e):
            raise CqkdError(f"teacher {path!r} does not fit dataset {info.name!r} "
                            f"({info.num_classes} classes, {info.channels} channels): {e}") from None
        raise
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    metrics = run.metrics() if run.metrics_file.exists() else {}
    return Teacher(model, str(run.path), cfg.model, input_size, info.mean, info.std, metrics,
                   digest=file_digest(weights))
