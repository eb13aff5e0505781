"""A finished run's logits on a split, from its saved weights (what calibration is fitted on)."""

from __future__ import annotations

import os

import torch

from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.core.signals import hang_if_asked
from cqkd.data.registry import make_loader
from cqkd.nets.teacher import load_weights
from cqkd.train.checkpoints import check_weights
from cqkd.train.module import CQKDModule
from cqkd.train.setup import build_student, load_splits
from cqkd.views.augment import step_generator, to_float


def _student_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` without its teacher: the same data, model and degradation, nothing to load."""
    if cfg.kind != "distill":
        return cfg
    temperature = 1.0 if cfg.temperature == "calibrated" else cfg.temperature
    return cfg.replace(kind="train", teacher=None, temperature=temperature, teacher_calibration="none")


@torch.no_grad()
def predict_splits(path: str | os.PathLike, names: list[str], batch_size: int = 512) -> dict[str, dict[str, torch.Tensor]]:
    """A finished run's logits on the splits ``names``: ``{split: {"logits", "labels"}}``.

    The view is the one the run is evaluated on (``validation_step``/``test_step``): the
    un-augmented image through ``CQKDModule.student_forward`` (the run's degradation), from
    its saved ``model.safetensors``, in eval mode. Noise in a degradation is drawn from a
    generator seeded by the run's seed, so repeated calls give the same logits.
    """

    run = RunDir(path)
    stored = run.config()
    cfg = _student_config(stored)
    weights = run.require_weights()

    check_weights(weights, stored)
    splits = load_splits(cfg)
    model = build_student(cfg, splits.info)
    load_weights(model, weights)
    module = CQKDModule(model, cfg, splits.info).eval()
    use_cuda = torch.cuda.is_available() and str(cfg.accelerator) in ("auto", "gpu", "cuda")
    module.to("cuda" if use_cuda else "cpu")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        data = splits.split(name)
        logits, labels = [], []
        for i, (x, y, _) in enumerate(make_loader(data, batch_size, shuffle=False)):
            g = step_generator(cfg.seed, i, stream=1)
            z = module.student_forward(to_float(x.to(module.device)), g)
            logits.append(z.float().cpu())
            labels.append(y.cpu())
            hang_if_asked("calibration")
        out[name] = {"logits": torch.cat(logits), "labels": torch.cat(labels)}
    return out


def predict_logits(path: str | os.PathLike, split: str = "test") -> dict[str, torch.Tensor]:
    """A finished run's ``{"logits", "labels"}`` on one split (see ``predict_splits``)."""
    return predict_splits(path, [split])[split]
