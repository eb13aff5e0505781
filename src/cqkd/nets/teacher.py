"""Loading a teacher, frozen and ready for distillation, from one of three sources:

* a cqkd run directory (``--teacher RUN_DIR``): architecture, input size and weights from the run;
* a weights file (``--teacher FILE --teacher-model NAME``): a state dict saved by ``torch.save``
  (``.pt``/``.pth``/``.bin``, read with ``weights_only=True``, never unpickling code) or a
  ``.safetensors`` file; its input normalisation is the dataset's;
* pretrained weights by name (``--teacher-model resnet50 --teacher-weights IMAGENET1K_V2``),
  downloaded by torchvision or timm (see ``cqkd.nets.pretrained``); normalised with the mean/std
  the weights were trained with.

Run-directory and file teachers see the dataset's input size (the crop for image folders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cqkd.core.io import file_sha256, load_safetensors, safetensors_header
from cqkd.core.rundir import RunDir
from cqkd.data.registry import DatasetInfo
from cqkd.errors import CqkdError
from cqkd.nets.pretrained import pretrained_model
from cqkd.nets.registry import build_model


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
    t_cal: float | None = None  # its fitted calibration temperature, where one was asked for
    digest: str = ""


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``model`` (never unpickles)."""
    state = load_safetensors(path)
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
    """A weights file's identity: the first 16 hex digits of its sha256."""
    return file_sha256(path)[:16]


def _check_classes(weights: Path, model: nn.Module, path: str, info: DatasetInfo) -> None:
    """Name the class-count mismatch plainly: the classifier is the last weight matrix."""
    shapes, _ = safetensors_header(weights)
    matrices = [k for k, v in model.state_dict().items() if v.ndim == 2]
    if matrices and matrices[-1] in shapes and len(shapes[matrices[-1]]) == 2:
        n = shapes[matrices[-1]][0]
        if n != info.num_classes:
            raise CqkdError(f"teacher {path!r} predicts {n} classes but dataset {info.name!r} has "
                            f"{info.num_classes}; distil from a teacher trained on the same classes")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: how a teacher is used, always."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Accepts a bare state dict or one under ``state_dict``/``model`` (checkpoints), and strips
    a ``module.``/``model.`` prefix shared by every key (DDP, Lightning).
    """

    if path.suffix == ".safetensors":
        state: Any = load_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors, truncated zip, disallowed globals
            msg = " ".join(str(e).split())[:200]
            raise CqkdError(f"{path} is not a loadable weights file ({type(e).__name__}: {msg})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CqkdError(f"{path} does not hold a state dict of tensors")
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_teacher_file(path: Path, model_name: str | None, info: DatasetInfo) -> Teacher:
    """A teacher from a weights file; ``model_name`` gives the architecture."""
    if not model_name:
        raise CqkdError(f"--teacher {str(path)!r} is a weights file: name its architecture with --teacher-model")
    model = build_model(model_name, info.num_classes, info.channels, info.image_size)
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CqkdError(f"{path} does not fit model {model_name!r} for {info.name!r} "
                        f"({info.num_classes} classes, {info.channels} channels): "
                        f"{' '.join(' '.join(first[:3]).split())[:300]}") from None
    return Teacher(freeze(model), str(path), model_name, info.image_size, info.mean, info.std,
                   digest=file_digest(path))


def load_teacher(path: str | None, info: DatasetInfo, model_name: str | None = None,
                 weights: str | None = None) -> Teacher:
    """The frozen teacher, in eval mode, for dataset ``info``: from pretrained ``weights`` (of
    ``model_name``), a weights file ``path`` (of ``model_name``) or a run directory ``path``."""
    if weights:

        if not model_name:
            raise CqkdError("--teacher-weights needs --teacher-model (e.g. resnet50)")
        pre = pretrained_model(model_name, weights, info.num_classes, info.channels)
        return Teacher(freeze(pre.model), pre.label, model_name, info.image_size, pre.mean, pre.std,
                       digest=pre.label)
    if path is None:
        raise CqkdError("no teacher: pass --teacher RUN_DIR, --teacher FILE --teacher-model NAME, "
                        "or --teacher-model NAME --teacher-weights WEIGHTS")
    if Path(path).is_file():
        return load_teacher_file(Path(path), model_name, info)
    run = RunDir(path)
    if not run.path.is_dir():
        raise CqkdError(f"--teacher {path!r} is not a directory or a weights file")
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
    freeze(model)
    metrics = run.metrics() if run.metrics_file.exists() else {}
    return Teacher(model, str(run.path), cfg.model, input_size, info.mean, info.std, metrics,
                   digest=file_digest(weights))
