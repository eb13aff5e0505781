"""Training on Lightning: one LightningModule for supervised and CQKD runs, and ``fit_run``.

One training step, top to bottom (see ``CQKDModule.training_step``)::

    x, y, idx   = batch                                  uint8 full-resolution images, dataset indices
    x_hr, z_t   = source(x, idx, g)                      a bank view of each image and the teacher's
                                                         logits on it (network or cache, same values)
    x_lr        = degrade(x_hr)                          the student's view of that crop
    z_s         = student(normalise(x_lr))
    loss        = (1-α)·CE(z_s, y) + α·T²·KL(softmax(z_t/(T_cal·T)) ‖ softmax(z_s/T))

Supervised runs draw a fresh random view of each image instead (``ViewSpec.sample``) and have no
``z_t``; see ``cqkd.teacher_source`` for the view bank and the teacher cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from cqkd import __version__
from cqkd.config import RunConfig
from cqkd.data import DatasetInfo, ImageData, Splits, load_dataset, make_loader
from cqkd.errors import CqkdError
from cqkd.losses import distillation_loss, supervised_loss
from cqkd.metrics import all_metrics, mean_kl
from cqkd.models import build_model, count_flops, count_params
from cqkd.quality import upsample_to
from cqkd.runs import RunDir, save_tensors, write_json
from cqkd.teacher import Teacher, load_teacher
from cqkd.teacher_source import TeacherSource, make_teacher_source
from cqkd.views import ViewSpec, apply_views, step_generator


class Normalize(nn.Module):
    """(x - mean) / std per channel, for float images in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class CQKDModule(L.LightningModule):
    """Trains ``model`` on degraded views; with a ``teacher``, by cross-quality distillation.

    The teacher is a frozen submodule: always in eval mode, never optimised, and left out of
    the checkpoints (it is reloaded from its own run directory). To train (rather than only
    test) with a teacher, pass the training split as ``train_data``: its views and the teacher's
    outputs on them come from a ``TeacherSource``.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, info: DatasetInfo, teacher: Teacher | None = None,
                 train_data: ImageData | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.info = info
        self.degrade = cfg.degradation_spec()
        self.views = ViewSpec.parse(cfg.augment)
        self.normalize = Normalize(info.mean, info.std)
        self.teacher_info = teacher
        self.teacher = teacher.model if teacher is not None else None
        if teacher is not None:
            self.teacher_normalize = Normalize(teacher.mean, teacher.std)
            self.teacher_temperature = teacher.temperature
            self.temperature = teacher.t_cal if cfg.temperature == "calibrated" else float(cfg.temperature)
            self.teacher.eval().requires_grad_(False)
        self.source: TeacherSource | None = None
        if teacher is not None and train_data is not None:
            self.source = make_teacher_source(cfg, teacher, train_data, info.num_classes)
        self.strict_loading = False  # checkpoints hold the student only
        self.val_top1 = torchmetrics.MeanMetric()
        self.val_nll = torchmetrics.MeanMetric()
        self._test_outputs: list[dict[str, torch.Tensor]] = []
        self.test_results: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- plumbing
    def train(self, mode: bool = True) -> "CQKDModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["cqkd"] = {"version": __version__, "config_digest": self.cfg.digest()}

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def student_forward(self, x_hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.model(self.normalize(self.degrade(x_hr, generator)))

    @torch.no_grad()
    def teacher_forward(self, x_hr: torch.Tensor) -> torch.Tensor:
        x = upsample_to(x_hr, self.teacher_info.input_size) if x_hr.shape[-1] != self.teacher_info.input_size else x_hr
        return self.teacher(self.teacher_normalize(x)).float()

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            if self.source is None:
                raise CqkdError("a CQKDModule with a teacher needs train_data to train")
            self.source.prepare(self.teacher_forward, self.device, self.global_rank, self.trainer.world_size,
                                self.trainer.strategy.barrier, progress=self.trainer.progress_bar_callback is not None)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        g = step_generator(self.cfg.seed, self.global_step, self.global_rank)
        if self.teacher is None:  # supervised: a fresh random view of each image
            x_hr, z_t = self.to_float(apply_views(x, self.views.sample(len(y), g))), None
        else:  # CQKD: a view from the image's bank and the teacher's logits on it
            x_hr, z_t = self.source(x, idx, g)
        z_s = self.student_forward(x_hr, g)
        if z_t is None:
            terms = supervised_loss(z_s, y)
        else:
            terms = distillation_loss(z_s, z_t, y, self.temperature, self.cfg.alpha, self.teacher_temperature)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"the loss became {terms['loss'].item()} at step {self.global_step}")
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=False, on_epoch=True,
                      prog_bar=False, batch_size=len(y))
        self.log("loss", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return terms["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, _ = batch
        z = self.student_forward(self.to_float(x))
        self.val_top1.update((z.argmax(-1) == y).float())
        self.val_nll.update(nn.functional.cross_entropy(z.float(), y, reduction="none"))
        self.log("val/top1", self.val_top1, prog_bar=True, on_epoch=True)
        self.log("val/nll", self.val_nll, prog_bar=False, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, nesterov=True, weight_decay=self.cfg.weight_decay)
        if self.cfg.schedule == "constant":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if self.cfg.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr, total_steps=max(total, 1))
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------- test
    def test_step(self, batch, batch_idx: int) -> None:
        x, y, idx = batch
        x_hr = self.to_float(x)
        x_lr = self.degrade(x_hr)
        out = {"idx": idx, "labels": y, "logits": self.model(self.normalize(x_lr)).float()}
        if self.teacher is not None:
            out["teacher_logits"] = self.teacher_forward(x_hr)
            out["teacher_lr_logits"] = self.teacher_forward(upsample_to(x_lr, x_hr.shape[-1]))
        self._test_outputs.append({k: v.detach() for k, v in out.items()})

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []

    def on_test_epoch_end(self) -> None:
        """Gather the test outputs of every process, drop the duplicates a distributed sampler
        pads with, and order them by sample index: every rank ends with the same tensors."""
        local = {k: torch.cat([o[k] for o in self._test_outputs]) for k in self._test_outputs[0]}
        if self.trainer.world_size > 1:
            gathered = {k: self.all_gather(v) for k, v in local.items()}
            local = {k: v.flatten(0, 1) for k, v in gathered.items()}
        order = torch.argsort(local["idx"])
        idx = local["idx"][order]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[1:] != idx[:-1]
        self.test_results = {k: v[order][keep].cpu() for k, v in local.items()}
        self._test_outputs = []


# ------------------------------------------------------------------------------ run driver

def is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def make_trainer(cfg: RunConfig, run_dir: Path | None, progress: bool = True, **overrides: Any) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    if os.environ.get("CQKD_QUIET_LIGHTNING"):
        import logging

        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    callbacks: list[Any] = []
    logger: Any = False
    if run_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/top1",
                                         mode="max", save_last=True, auto_insert_metric_name=False,
                                         enable_version_counter=False))
        logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        num_nodes=cfg.num_nodes, precision=cfg.precision, logger=logger, callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=10, enable_checkpointing=run_dir is not None,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def prepare(cfg: RunConfig) -> tuple[Splits, nn.Module, Teacher | None]:
    """Load data, teacher and student for ``cfg``, checking everything a user can get wrong."""
    cfg.validate()
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_samples)
    info = splits.info
    degradation = cfg.degradation_spec()
    if degradation.size > info.image_size:
        raise CqkdError(f"--size {degradation.size} is larger than the {info.name} images ({info.image_size} px)")
    teacher = None
    if cfg.kind == "distill":
        teacher = load_teacher(cfg.teacher, info)
        if degradation.size > teacher.input_size:
            raise CqkdError(f"--size {degradation.size} is larger than the teacher's input ({teacher.input_size} px)")
        if cfg.teacher_calibration == "temperature" or cfg.temperature == "calibrated":
            from cqkd.calibration import teacher_temperature

            teacher.t_cal = teacher_temperature(cfg.teacher, fit_if_missing=True)
        if cfg.teacher_calibration == "temperature":
            teacher.temperature = teacher.t_cal
    model = build_model(cfg.model, info.num_classes, info.channels, degradation.output_size(info.image_size))
    return splits, model, teacher


def fit_run(cfg: RunConfig, out: str | os.PathLike, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (supervised or CQKD) as configured, writing the run directory ``out``.

    Returns the metrics written to ``metrics.json``.
    """
    splits, model, teacher = prepare(cfg)
    run = RunDir(out)
    if is_rank_zero():
        run.prepare(cfg, force=force)
    start = time.time()
    try:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model = build_model(cfg.model, splits.info.num_classes, splits.info.channels,
                            cfg.degradation_spec().output_size(splits.info.image_size))  # seeded init
        module = CQKDModule(model, cfg, splits.info, teacher, train_data=splits.train)
        trainer = make_trainer(cfg, run.path, progress)
        train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                   drop_last=len(splits.train) > cfg.batch_size, seed=cfg.seed)
        val_loader = make_loader(splits.val, 512, shuffle=False, num_workers=cfg.num_workers)
        trainer.fit(module, train_loader, val_loader)
        if trainer.interrupted:
            raise KeyboardInterrupt
        trainer.test(module, make_loader(splits.test, 512, shuffle=False, num_workers=cfg.num_workers),
                     ckpt_path="best", verbose=False)
        metrics = collect_metrics(module, cfg, splits.info, teacher)
        ckpt = trainer.checkpoint_callback
        metrics.update(best_val_top1=_float(ckpt.best_model_score), best_checkpoint=Path(ckpt.best_model_path).name,
                       train_samples_used=len(splits.train), time_s=round(time.time() - start, 1))
        if trainer.is_global_zero:
            save_outputs(run, module, metrics)
        return metrics
    except BaseException as e:
        if is_rank_zero():
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            run.set_state("failed", error=reason)
        raise


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def collect_metrics(module: CQKDModule, cfg: RunConfig, info: DatasetInfo, teacher: Teacher | None) -> dict[str, Any]:
    res = module.test_results
    size = cfg.degradation_spec().output_size(info.image_size)
    metrics: dict[str, Any] = all_metrics(res["logits"], res["labels"], cfg.ece_bins)
    metrics.update(
        kind=cfg.kind, dataset=cfg.dataset, model=cfg.model, size=cfg.degradation_spec().size,
        input_size=size, degradation=cfg.degradation_spec().spec(), params=count_params(module.model),
        flops=count_flops(module.model, info.channels, size), epochs=cfg.epochs, seed=cfg.seed,
        train_samples=cfg.train_samples, cqkd_version=__version__, config_digest=cfg.digest(),
    )
    if teacher is not None:
        metrics.update(
            temperature=module.temperature, temperature_mode="calibrated" if cfg.temperature == "calibrated" else "fixed",
            alpha=cfg.alpha, teacher=teacher.path, teacher_model=teacher.model_name,
            teacher_calibration=cfg.teacher_calibration, t_cal=teacher.t_cal,
            teacher_temperature_applied=module.teacher_temperature,
            teacher_metrics=_summary(all_metrics(res["teacher_logits"], res["labels"], cfg.ece_bins)),
            teacher_lr_metrics=_summary(all_metrics(res["teacher_lr_logits"], res["labels"], cfg.ece_bins)),
            kl_teacher_student=mean_kl(res["teacher_logits"], res["logits"]),
        )
        if module.source is not None:
            metrics.update(module.source.describe())
    return metrics


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "nll", "brier", "ece", "entropy", "confidence")
    return {k: m[k] for k in keys if k in m}


def save_outputs(run: RunDir, module: CQKDModule, metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    res = module.test_results
    save_tensors(run.logits_file, {k: v for k, v in res.items() if k != "idx"})
    tmp = run.weights_file.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}, str(tmp),
              metadata={"cqkd_version": __version__, "model": module.cfg.model})
    os.replace(tmp, run.weights_file)
    try:
        from cqkd.plots import reliability_diagram

        reliability_diagram([(run.path.name, res["logits"], res["labels"])], run.path / "reliability.png",
                            n_bins=module.cfg.ece_bins)
    except ImportError:
        pass
    write_json(run.metrics_file, metrics)
    run.set_state("finished")


def evaluate_run(path: str | os.PathLike, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Recompute a finished run's test metrics from its saved weights."""
    from cqkd.teacher import load_weights

    run = RunDir(path)
    cfg = run.config()
    if overrides:
        cfg = cfg.replace(**overrides)
    weights = run.require_weights()
    splits, model, teacher = prepare(cfg)
    load_weights(model, weights)
    module = CQKDModule(model, cfg, splits.info, teacher)
    trainer = make_trainer(cfg, None, progress, devices=1, strategy="auto", num_nodes=1, logger=False)
    trainer.test(module, make_loader(splits.test, 512, shuffle=False), verbose=False)
    return collect_metrics(module, cfg, splits.info, teacher)
