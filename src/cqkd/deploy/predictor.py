"""A run's model and its evaluation preprocessing as one ``torch.nn.Module``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cqkd.calibration.scaling import read_calibration
from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.data.folder import FolderSplit
from cqkd.data.registry import Splits
from cqkd.deploy.images import ImageInput, full_view, read_image, to_channels
from cqkd.errors import CqkdError
from cqkd.nets.teacher import file_digest
from cqkd.train.module import Normalize
from cqkd.train.predict import load_trained
from cqkd.views.augment import to_float
from cqkd.views.degrade import Degradation


@dataclass
class Predictions:
    """Class probabilities for N images: ``probs = softmax(logits / t_cal)`` (``t_cal`` None: T = 1)."""

    logits: torch.Tensor  # (N, K) the model's raw logits
    probs: torch.Tensor  # (N, K)
    classes: tuple[str, ...]
    t_cal: float | None

    def labels(self) -> list[str]:
        """The top-1 class name of each image."""
        return [self.classes[i] for i in self.probs.argmax(-1).tolist()]

    def top(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable (class name, probability) pairs of each image, best first."""
        if k < 1:
            raise CqkdError(f"top-k must be at least 1, got {k}")
        values, index = self.probs.topk(min(k, self.probs.shape[-1]), dim=-1)
        return [[(self.classes[i], float(p)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(index.tolist(), values.tolist())]


def deploy_degradation(degradation: Degradation) -> Degradation:
    """The degradation applied at deployment: the training one without noise and without JPEG
    (images met in deployment already carry their compression; compressing again would double it)."""
    return dataclasses.replace(degradation, noise=0.0, jpeg="")


class Predictor(nn.Module):
    """Full-resolution images (N, C, S, S), uint8 or float in [0, 1], to the run's logits.

    ``forward`` is the run's evaluation path, ``model(normalize(degrade(x)))`` (as
    ``CQKDModule.student_forward``), with the degradation's noise left out (it is random) and
    its JPEG left out (deployed images are already compressed: ``deploy_degradation``).
    ``predict`` also reads files, PIL images and tensors of any size and channel count.
    """

    def __init__(self, model: nn.Module, degradation: Degradation, mean: Sequence[float], std: Sequence[float],
                 classes: Sequence[str], image_size: int, channels: int, folder_crop: int | None = None,
                 t_cal: float | None = None, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.degradation = deploy_degradation(degradation)
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.classes = tuple(classes)
        self.image_size, self.channels, self.folder_crop = image_size, channels, folder_crop
        self.t_cal = t_cal
        self.meta = dict(meta or {})
        self.eval()

    @property
    def input_size(self) -> int:
        """The side length of the model's own input (the student's size)."""
        return self.degradation.output_size(self.image_size)

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return next(self.model.parameters()).device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution images to the model's normalised input (degraded to its size)."""
        return self.normalize(self.degradation(to_float(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))

    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images of any size and channel count as a float batch (N, C, S, S) in [0, 1]: the
        run's channels, its evaluation view at full resolution (see ``images.full_view``)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise CqkdError("no images to predict")
        batch = []
        for item in items:
            x = to_channels(read_image(item), self.channels)
            x = full_view(x, self.image_size, self.folder_crop)
            batch.append(to_float(x) if x.ndim == 4 else to_float(x).unsqueeze(0))
        return torch.cat(batch)

    @torch.inference_mode()
    def forward_batches(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``forward`` on a full-resolution batch in chunks of ``batch_size``: logits on the CPU."""
        return torch.cat([self(x[i:i + batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(x), batch_size)])

    def logits(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 256) -> torch.Tensor:
        """The raw logits (N, K) of ``images`` (see ``prepare``)."""
        return self.forward_batches(self.prepare(images), batch_size)

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> Predictions:
        """``softmax(logits / t_cal)``, or ``softmax(logits)`` when uncalibrated."""
        t = self.t_cal if calibrated else None
        probs = torch.softmax(logits.float() / t if t is not None else logits.float(), dim=-1)
        return Predictions(logits, probs, self.classes, t)

    def predict(self, images: ImageInput | Sequence[ImageInput], calibrated: bool = True,
                batch_size: int = 256) -> Predictions:
        """Class probabilities of ``images`` (paths, PIL images, tensors), calibrated with the
        run's T_cal when it has one and ``calibrated``."""
        return self.probabilities(self.logits(images, batch_size), calibrated)


def run_temperature(run: RunDir, weights: Path) -> float | None:
    """T_cal from the run's ``calibration.json`` (None without one), checked against its weights."""
    data = read_calibration(run.path)
    if data is None:
        return None
    digest = data.get("weights_digest")
    if digest is not None and digest != file_digest(weights):
        raise CqkdError(f"{run.calibration_file} was fitted for other weights than {weights}; rerun "
                        f"`cqkd calibrate {run.path}` or predict without calibration")
    return float(data["t_cal"])


def open_run(path: str | os.PathLike, calibration: bool = True) -> tuple[Predictor, RunConfig, Splits]:
    """The predictor of the run in ``path`` with the run's config and dataset splits."""
    if not RunDir(path).path.is_dir():
        raise CqkdError(f"run {str(path)!r} does not exist or is not a directory")
    trained = load_trained(path, reseed=False)  # the model loading of evaluate and calibrate
    run, cfg, weights, splits, model = trained.run, trained.cfg, trained.weights, trained.splits, trained.model
    info = splits.info
    degradation = cfg.degradation_spec()
    folder_crop = splits.test.crop_size if isinstance(splits.test, FolderSplit) else None
    meta = {"run": str(run.path), "kind": cfg.kind, "model": cfg.model, "dataset": info.name,
            "degradation": degradation.spec(), "weights": str(weights)}
    t_cal = run_temperature(run, weights) if calibration else None
    predictor = Predictor(model, degradation, info.mean, info.std, info.classes or
                          tuple(f"class-{i}" for i in range(info.num_classes)), info.image_size, info.channels,
                          folder_crop, t_cal, meta)
    return predictor, cfg, splits


def load_predictor(path: str | os.PathLike, calibration: bool = True, device: str | torch.device = "cpu") -> Predictor:
    """The model of the run in ``path`` with its evaluation preprocessing, in eval mode.

    Needs the run's ``config.yaml``, ``model.safetensors`` and its dataset (for the class names
    and the normalisation); T_cal comes from ``calibration.json`` unless ``calibration=False``.
    """
    return open_run(path, calibration)[0].to(device)
