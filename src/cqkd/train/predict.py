"""Running a trained model on a split: the one path that ``evaluate_run``, calibration
(``predict_splits``) and the teacher's memoised test outputs go through, and the one loader of a
finished run's model (also behind the deploy ``Predictor``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cqkd.core import faults
from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.data.registry import ImageData, Splits, make_loader
from cqkd.nets.registry import build_model
from cqkd.nets.teacher import load_weights
from cqkd.train.checkpoints import check_weights
from cqkd.train.module import CQKDModule
from cqkd.train.setup import build_student, load_splits, make_trainer


@dataclass(frozen=True)
class TrainedModel:
    """A finished run's student network with its saved weights loaded, its config and its data."""
    run: RunDir
    cfg: RunConfig  # the stored config, with any overrides applied
    weights: Path
    splits: Splits
    model: nn.Module


def load_trained(path: str | os.PathLike, reseed: bool = True, **overrides: object) -> TrainedModel:
    """The run in ``path`` with its ``model.safetensors`` loaded (checked against its config).

    ``reseed`` builds the network as training did (``build_student``: the global generators are
    seeded with the run's seed, which is what the evaluation's degradation noise draws from);
    without it the global generators are left alone (the deploy ``Predictor``)."""
    run = RunDir(path)
    stored = run.config()
    cfg = stored.replace(**overrides) if overrides else stored
    weights = run.require_weights()
    check_weights(weights, stored)
    splits = load_splits(cfg)
    info = splits.info
    if reseed:
        model = build_student(cfg, info)
    else:
        model = build_model(cfg.model, info.num_classes, info.channels,
                            cfg.degradation_spec().output_size(info.image_size))
    load_weights(model, weights)
    return TrainedModel(run, cfg, weights, splits, model)


def run_on_split(module: CQKDModule, data: ImageData, progress: bool = False, batch_size: int = 512,
                 test_split: bool = False, quiet: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s evaluation pass over ``data`` in order, on one device at its config's precision.

    The view is the run's evaluation view (``CQKDModule.test_step``: the un-augmented image,
    degraded as the run was). Returns ``{"idx", "labels", "logits"}``, with a teacher also
    ``teacher_logits`` (full resolution) and ``teacher_lr_logits`` (the degraded view upsampled).
    With ``test_split``, the teacher's outputs come from its memo when a sibling student saved
    them, and are memoised for the next one otherwise. ``quiet``: no Lightning banners."""
    if test_split:
        module.load_teacher_memo(data)
    trainer = make_trainer(module.cfg, None, progress, devices=1, strategy="auto", num_nodes=1, logger=False,
                           quiet=quiet)
    trainer.test(module, make_loader(data, batch_size, shuffle=False), verbose=False)
    if test_split:
        module.save_teacher_memo()
    return module.test_results


def student_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` without its teacher: the same data, model and degradation, nothing to load (evaluation of the student alone)."""
    if cfg.kind != "distill":
        return cfg
    temperature = 1.0 if cfg.temperature == "calibrated" else cfg.temperature
    return cfg.replace(kind="train", teacher=None, temperature=temperature, teacher_calibration="none")


def predict_splits(path: str | os.PathLike, names: list[str], batch_size: int = 512,
                   quiet: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A finished run's logits on the splits ``names``: ``{split: {"logits", "labels"}}``.

    Through ``run_on_split`` (the run's evaluation view) in float32, on a GPU when one is there
    and the run allows it, else on the CPU. Noise in a degradation is drawn from the global
    generators, seeded by ``load_trained``, so repeated calls give the same logits.
    """
    run_cfg = RunDir(path).config()
    gpu = torch.cuda.is_available() and str(run_cfg.accelerator) in ("auto", "gpu", "cuda")
    trained = load_trained(path)
    cfg = student_config(trained.cfg).replace(accelerator="gpu" if gpu else "cpu", precision="32")
    module = CQKDModule(trained.model, cfg, trained.splits.info)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        faults.point("calibration")
        res = run_on_split(module, trained.splits.split(name), batch_size=batch_size, quiet=quiet)
        out[name] = {"logits": res["logits"], "labels": res["labels"]}
    return out


def predict_logits(path: str | os.PathLike, split: str = "test") -> dict[str, torch.Tensor]:
    """A finished run's ``{"logits", "labels"}`` on one split (see ``predict_splits``)."""
    return predict_splits(path, [split])[split]
