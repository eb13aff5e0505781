"""Pretrained weights by name: torchvision's weight enums and timm's pretrained tags.

``pretrained_model("resnet50", "IMAGENET1K_V2", num_classes=1000, in_channels=3)`` returns the
network with those weights and the input normalisation they were trained with (mean/std
from the weights' metadata). The weights are downloaded (and cached) by torchvision or timm
where there is internet; where there is none, the error says so in one line and how to work
around it (a local file via ``--teacher FILE --teacher-model NAME``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from cqkd.errors import CqkdError

DOWNLOAD_TIMEOUT_S = 30.0


@dataclass
class Pretrained:
    """A pretrained model with its label and the input normalisation and size it expects."""
    model: nn.Module
    label: str  # e.g. "torchvision:resnet50.IMAGENET1K_V2"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _download(fn, what: str, hint: str):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return fn()
    except Exception as e:  # no internet, proxy, blocked, disk full, corrupt cache ...
        raise CqkdError(f"cannot download {what} ({_one_line(e)}); without internet, {hint}") from None
    finally:
        socket.setdefaulttimeout(old)


def _check_fit(label: str, classes: int, num_classes: int, in_channels: int) -> None:
    if classes != num_classes:
        raise CqkdError(f"{label} has {classes} classes but the dataset has {num_classes}")
    if in_channels != 3:
        raise CqkdError(f"{label} takes RGB images but the dataset has {in_channels} channel(s)")


def torchvision_pretrained(name: str, weights: str, num_classes: int, in_channels: int) -> Pretrained:
    """Torchvision model ``name`` with pretrained ``weights``, checked against the classes and channels."""

    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception:  # noqa: BLE001
        raise CqkdError(f"torchvision has no pretrained weights for model {name!r}") from None
    try:
        w = enum[weights]
    except KeyError:
        valid = ", ".join(list(enum.__members__))
        raise CqkdError(f"unknown weights {weights!r} for torchvision model {name!r} (valid: {valid})") from None
    label = f"torchvision:{name}.{w.name}"
    _check_fit(label, len(w.meta.get("categories") or []), num_classes, in_channels)
    hub = torch.hub.get_dir()
    state = _download(lambda: w.get_state_dict(progress=False, check_hash=True), f"torchvision weights {label}",
                      f"copy {w.url.rsplit('/', 1)[-1]} into {hub}/checkpoints/ (or set TORCH_HOME), "
                      f"or pass the file as --teacher FILE --teacher-model {name}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    model.load_state_dict(state)
    tf = w.transforms()
    crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else int(tf.crop_size)
    return Pretrained(model, label, tuple(float(x) for x in tf.mean), tuple(float(x) for x in tf.std), int(crop))


def timm_pretrained(arch: str, weights: str, num_classes: int, in_channels: int) -> Pretrained:
    """Timm model ``arch`` with pretrained ``weights``, checked against the classes and channels."""
    import timm  # optional backend: imported only when asked for

    full = arch if weights in ("pretrained", "DEFAULT", "default") else f"{arch}.{weights}"
    label = f"timm:{full}"
    try:
        cfg = timm.get_pretrained_cfg(full)
    except Exception:  # noqa: BLE001
        cfg = None
    if cfg is None:
        raise CqkdError(f"timm has no pretrained weights {full!r}")
    classes = getattr(cfg, "num_classes", None)
    if classes:
        _check_fit(label, int(classes), num_classes, in_channels)
    model = _download(lambda: timm.create_model(full, pretrained=True, num_classes=num_classes),
                      f"timm weights {label}",
                      f"set HF_HUB_CACHE to a copy of the Hugging Face cache, or pass a state-dict file as "
                      f"--teacher FILE --teacher-model timm:{arch}")
    pcfg = model.pretrained_cfg
    size = pcfg.get("input_size", (3, 224, 224))[-1]
    return Pretrained(model, label, tuple(pcfg["mean"]), tuple(pcfg["std"]), int(size))


def pretrained_model(name: str, weights: str, num_classes: int, in_channels: int) -> Pretrained:
    """``name`` is a torchvision model name or ``timm:ARCH``; ``weights`` a torchvision enum
    member (``IMAGENET1K_V2``, ``DEFAULT``) or a timm tag (``pretrained``, ``a1_in1k``)."""
    if name.startswith("timm:"):
        return timm_pretrained(name[len("timm:"):], weights, num_classes, in_channels)
    return torchvision_pretrained(name, weights, num_classes, in_channels)
