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

import hashlib
import os
import sys
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
from cqkd.runs import RunDir, atomic_write, load_tensors, save_tensors, write_json
from cqkd.teacher import Teacher, load_teacher
from cqkd.teacher_source import TeacherSource, make_teacher_source
from cqkd.cache import BANK_SEED
from cqkd.views import ViewBank, ViewSpec, apply_views, step_generator, to_float


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
        # datasets whose loader draws the views (imagefolder: random resized crop + flip in the
        # workers) get the identity here; the degradation still runs on the batch, on the device
        self.views = ViewSpec(flip=False, translate=0) if info.loader_augments else ViewSpec.parse(cfg.augment)
        self.normalize = Normalize(info.mean, info.std)
        self.teacher_info = teacher
        self.teacher = teacher.model if teacher is not None else None
        if teacher is not None:
            self.teacher_normalize = Normalize(teacher.mean, teacher.std)
            self.teacher_temperature = teacher.temperature
            self.temperature = teacher.t_cal if cfg.temperature == "calibrated" else float(cfg.temperature)
            self.teacher.eval().requires_grad_(False)
        self.source: TeacherSource | None = None
        self.bank: ViewBank | None = None
        if teacher is not None and train_data is not None and not info.loader_augments:
            # (a loader that draws random crops has no per-image views to bank or cache: the
            # teacher runs online on each batch's crops, below)
            self.source = make_teacher_source(cfg, teacher, train_data, info.num_classes)
        elif train_data is not None and not info.loader_augments:
            # supervised runs draw from the same per-image bank as distillation (same k, same
            # seed, same draws from the step generator): a supervised and a distilled student
            # of one seed see the same views, and differ only in the loss
            self.bank = ViewBank(self.views, len(train_data), cfg.views_per_image, BANK_SEED)
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

    def student_forward(self, x_hr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.model(self.normalize(self.degrade(x_hr, generator)))

    @torch.no_grad()
    def teacher_forward(self, x_hr: torch.Tensor) -> torch.Tensor:
        x = upsample_to(x_hr, self.teacher_info.input_size) if x_hr.shape[-1] != self.teacher_info.input_size else x_hr
        return self.teacher(self.teacher_normalize(x)).float()

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.source is not None:
            self.source.prepare(self.teacher_forward, self.device, self.global_rank, self.trainer.world_size,
                                self.trainer.strategy.barrier, progress=self.trainer.progress_bar_callback is not None)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        g = step_generator(self.cfg.seed, self.global_step, self.global_rank)
        if self.source is not None:  # CQKD: a view from the image's bank and the teacher's logits on it
            x_hr, z_t = self.source(x, idx, g)
        elif self.bank is not None:  # supervised: a view from the image's bank, drawn as above
            x_hr = to_float(apply_views(x, self.bank.params(idx, self.bank.draw(len(idx), g))))
            z_t = None
        else:  # the loader drew the views (image folders): identity here
            x_hr = to_float(apply_views(x, self.views.sample(len(y), g)))
            z_t = self.teacher_forward(x_hr) if self.teacher is not None else None
        z_s = self.student_forward(x_hr, g)
        if z_t is None:
            terms = supervised_loss(z_s, y, self.cfg.label_smoothing)
        else:
            terms = distillation_loss(z_s, z_t, y, self.temperature, self.cfg.alpha, self.teacher_temperature,
                                      self.cfg.label_smoothing)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"the loss became {terms['loss'].item()} at step {self.global_step}")
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=False, on_epoch=True,
                      prog_bar=False, batch_size=len(y))
        self.log("loss", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return terms["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, _ = batch
        z = self.student_forward(to_float(x))
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
        x_hr = to_float(x)
        x_lr = self.degrade(x_hr)
        out = {"idx": idx, "labels": y, "logits": self.model(self.normalize(x_lr)).float()}
        if self.teacher is not None and self.teacher_memo is not None:
            rows = idx.cpu()
            out["teacher_logits"] = self.teacher_memo["teacher_logits"][rows].to(self.device)
            out["teacher_lr_logits"] = self.teacher_memo["teacher_lr_logits"][rows].to(self.device)
        elif self.teacher is not None:
            out["teacher_logits"] = self.teacher_forward(x_hr)
            out["teacher_lr_logits"] = self.teacher_forward(upsample_to(x_lr, x_hr.shape[-1]))
        self._test_outputs.append({k: v.detach() for k, v in out.items()})

    # ------------------------------------------------------- the teacher's test outputs, shared by students
    teacher_memo: dict[str, torch.Tensor] | None = None

    def teacher_memo_path(self) -> Path | None:
        """Where the teacher's test logits (on the full-resolution view, and on this run's
        degraded view upsampled) are kept for other students: they depend only on the teacher's
        weights, the test split and the degradation. None where they cannot be reused."""
        t = self.teacher_info
        if t is None or not t.digest or not Path(t.path).is_dir() or self.degrade.noise > 0:
            return None
        key = f"{t.digest}-{self.info.name}-{self.degrade.spec()}-{self.cfg.precision}"
        return Path(t.path) / "eval" / f"test-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def load_teacher_memo(self, num_test: int) -> None:
        path = self.teacher_memo_path()
        self.teacher_memo = None
        if path is None or not path.exists():
            return
        try:
            memo = load_tensors(path)
        except CqkdError:
            return  # damaged: recomputed and rewritten
        if all(memo.get(k) is not None and len(memo[k]) == num_test for k in ("teacher_logits", "teacher_lr_logits")):
            self.teacher_memo = memo

    def save_teacher_memo(self) -> None:
        path = self.teacher_memo_path()
        res = self.test_results
        if path is None or self.teacher_memo is not None or "teacher_logits" not in res:
            return
        if not torch.equal(res["idx"], torch.arange(len(res["idx"]))):
            return  # not the whole split in order
        try:
            save_tensors(path, {"teacher_logits": res["teacher_logits"], "teacher_lr_logits": res["teacher_lr_logits"]})
        except OSError:
            pass  # a read-only teacher directory: nothing to share, nothing lost

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
    """True in the process that owns the run directory (before and after the Trainer exists):
    global rank 0 under torchrun/Lightning's launcher (RANK, LOCAL_RANK, NODE_RANK) and SLURM."""
    return all(int(os.environ.get(v, 0) or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def make_trainer(cfg: RunConfig, run_dir: Path | None, progress: bool = True,
                 extra_callbacks: list[Any] | None = None, resume_step: int | None = None,
                 **overrides: Any) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from cqkd.robust import AtomicCheckpointIO, make_csv_logger

    if os.environ.get("CQKD_QUIET_LIGHTNING"):
        import logging

        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    callbacks: list[Any] = []
    logger: Any = False
    if run_dir is not None:
        # an absolute dirpath, so that a resumed run (any spelling of --out) keeps its best-checkpoint state
        callbacks.append(ModelCheckpoint(dirpath=Path(run_dir).resolve() / "checkpoints", filename="best",
                                         monitor="val/top1", mode="max", save_last=True,
                                         auto_insert_metric_name=False, enable_version_counter=False))
        logger = make_csv_logger(Path(run_dir), keep_before_step=resume_step)
    callbacks.extend(extra_callbacks or [])
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        num_nodes=cfg.num_nodes, precision=cfg.precision, logger=logger, callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=10, enable_checkpointing=run_dir is not None,
        plugins=[AtomicCheckpointIO()],  # atomic writes; loads only with weights_only=True
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def prepare(cfg: RunConfig) -> tuple[Splits, nn.Module, Teacher | None]:
    """Load data, teacher and student for ``cfg``, checking everything a user can get wrong.

    The student is initialised from ``cfg.seed`` (the global generators are seeded here)."""
    cfg.validate()
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.val_size, crop_size=cfg.crop_size,
                          skip_bad_images=cfg.skip_bad_images, augment=cfg.augment)
    info = splits.info
    degradation = cfg.degradation_spec()
    if degradation.size > info.image_size:
        raise CqkdError(f"--size {degradation.size} is larger than the {info.name} images ({info.image_size} px)")
    teacher = None
    if cfg.kind == "distill":
        teacher = load_teacher(cfg.teacher, info, cfg.teacher_model, cfg.teacher_weights)
        if degradation.size > teacher.input_size:
            raise CqkdError(f"--size {degradation.size} is larger than the teacher's input ({teacher.input_size} px)")
        if cfg.teacher_calibration == "temperature" or cfg.temperature == "calibrated":
            from cqkd.calibration import teacher_temperature

            if not Path(cfg.teacher or "").is_dir():
                raise CqkdError("teacher calibration needs a teacher run directory (--teacher RUN_DIR)")
            teacher.t_cal = teacher_temperature(cfg.teacher, fit_if_missing=True)
        if cfg.teacher_calibration == "temperature":
            teacher.temperature = teacher.t_cal
    # seeded last, so that the student's initialisation depends on the seed alone (not on
    # whatever loading the teacher drew from the global generator)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build_model(cfg.model, info.num_classes, info.channels, degradation.output_size(info.image_size))
    return splits, model, teacher


def fit_run(cfg: RunConfig, out: str | os.PathLike, force: bool = False, progress: bool = True,
            resume: bool = False) -> dict[str, Any]:
    """Train (supervised or CQKD) as configured, writing the run directory ``out``.

    With ``resume``, continue the interrupted run in ``out`` from its most advanced checkpoint
    (see ``cqkd.robust``); its stored configuration must match ``cfg``.
    Returns the metrics written to ``metrics.json``.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cqkd.errors import RunFailed, RunInterrupted
    from cqkd.robust import (RunGuard, SigtermOutsideFit, check_data_dir, check_teacher, checkpoint_step,
                             resume_checkpoint, shuffle_generator)

    run = RunDir(out)
    if resume and force:
        raise CqkdError("--resume and --force contradict each other: --resume continues the run in --out, "
                        "--force starts it over")
    check_data_dir(cfg.data_dir)
    ckpt_path = resume_checkpoint(run, cfg) if resume else None  # checked before any work
    splits, model, teacher = prepare(cfg)
    if ckpt_path is not None and teacher is not None:
        check_teacher(ckpt_path, teacher.digest, teacher.path)
    if is_rank_zero():
        run.prepare(cfg, force=force, resume=resume)
        if resume and ckpt_path is None:
            print(f"cqkd: {out} has no checkpoint yet; starting it from the beginning", file=sys.stderr)
    start = time.time()
    guard = RunGuard(run.path / "checkpoints", cfg.checkpoint_every_n_steps, cfg.seed, None,
                     teacher.digest if teacher is not None else None)
    trainer: Any = None
    with SigtermOutsideFit(guard):
        try:
            module = CQKDModule(model, cfg, splits.info, teacher, train_data=splits.train)
            pin = _pin_memory(cfg)
            eval_batch = 512 if not splits.info.loader_augments else max(cfg.batch_size, 64)
            train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                                       drop_last=len(splits.train) > cfg.batch_size, seed=cfg.seed, pin_memory=pin)
            guard.train_generator = shuffle_generator(train_loader)
            trainer = make_trainer(cfg, run.path, progress, extra_callbacks=[guard],
                                   resume_step=checkpoint_step(ckpt_path) if ckpt_path else None)
            val_loader = make_loader(splits.val, eval_batch, shuffle=False, num_workers=cfg.num_workers,
                                     pin_memory=pin)
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if trainer.interrupted:
                raise KeyboardInterrupt
            module.load_teacher_memo(len(splits.test))  # the teacher's test outputs, if a sibling saved them
            trainer.test(module, make_loader(splits.test, eval_batch, shuffle=False, num_workers=cfg.num_workers,
                                             pin_memory=pin), ckpt_path="best", verbose=False)
            metrics = collect_metrics(module, cfg, splits.info, teacher)
            metrics.update(data_facts(cfg, splits), world_size=trainer.world_size, precision=str(trainer.precision))
            ckpt = trainer.checkpoint_callback
            metrics.update(best_val_top1=_float(ckpt.best_model_score), best_checkpoint=Path(ckpt.best_model_path).name,
                           train_samples_used=len(splits.train), time_s=round(time.time() - start, 1))
            if resume:
                metrics["resumed_from"] = ckpt_path.name if ckpt_path else None
            if trainer.is_global_zero:
                save_outputs(run, module, metrics)
                module.save_teacher_memo()
                for name in ("step.ckpt", "interrupted.ckpt"):  # only needed to resume; keep last and best
                    (run.checkpoint_dir / name).unlink(missing_ok=True)
            return metrics
        except RunInterrupted as e:
            step = e.step or (trainer.global_step if trainer is not None else 0)
            _mark_failed(run, "interrupted", signal=e.signal_name, step=step, checkpoint=e.checkpoint)
            raise
        except SIGTERMException:
            saved = guard.saved_interrupt
            step = trainer.global_step if trainer is not None else 0
            _mark_failed(run, "interrupted", signal="SIGTERM", step=step, checkpoint=saved)
            raise RunInterrupted("SIGTERM", step, saved) from None
        except FloatingPointError as e:
            _mark_failed(run, f"diverged: {e}")
            raise RunFailed(f"training diverged: {e}; run {str(out)!r} marked failed "
                            "(lower --lr, or check the data)") from None
        except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning turns it into sys.exit(1)
            _mark_failed(run, "interrupted")
            raise KeyboardInterrupt from None
        except BaseException as e:
            _mark_failed(run, f"{type(e).__name__}: {e}")
            raise


def _mark_failed(run: RunDir, reason: str, **info: Any) -> None:
    if is_rank_zero():
        run.set_state("failed", error=reason, **info)


def _pin_memory(cfg: RunConfig) -> bool:
    return cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def data_facts(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    """What the run's data looked like beyond the config (views drawn by the loader, skipped
    unreadable files). A collective when images are skipped: call it on every rank."""
    facts: dict[str, Any] = dict(splits.extra) if splits.extra else {}
    if cfg.skip_bad_images:
        from cqkd.data_folder import skipped_files

        skipped = skipped_files(splits)
        facts.update(skipped_images=len(skipped), skipped_files=skipped[:100])
    return facts


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
        elif info.loader_augments:
            metrics.update(teacher_cache=cfg.teacher_cache, teacher_source="online",
                           teacher_source_reason="the loader draws random crops: no per-image views to cache")
    return metrics


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "nll", "brier", "ece", "entropy", "confidence")
    return {k: m[k] for k in keys if k in m}


def save_outputs(run: RunDir, module: CQKDModule, metrics: dict[str, Any]) -> None:
    from safetensors.torch import save

    res = module.test_results
    save_tensors(run.logits_file, {k: v for k, v in res.items() if k != "idx"})
    state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
    meta = {"cqkd_version": __version__, "model": module.cfg.model, "config_digest": module.cfg.digest()}
    atomic_write(run.weights_file, lambda f: f.write(save(state, metadata=meta)), mode="wb")
    write_json(run.metrics_file, metrics)
    try:  # a figure is a convenience: failing to draw it must not lose the run
        from cqkd.plots import reliability_diagram

        reliability_diagram([(run.path.name, res["logits"], res["labels"])], run.path / "reliability.png",
                            n_bins=module.cfg.ece_bins)
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"could not draw {run.path / 'reliability.png'}: {type(e).__name__}: {e}", stacklevel=2)
    run.set_state("finished")


def evaluate_run(path: str | os.PathLike, progress: bool = True, outputs: dict[str, torch.Tensor] | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """Recompute a finished run's test metrics from its saved weights.

    ``outputs``, if given, receives the test tensors (``logits``, ``labels``, ...)."""
    from cqkd.teacher import load_weights

    run = RunDir(path)
    stored = run.config()
    cfg = stored.replace(**overrides) if overrides else stored
    weights = run.require_weights()
    from cqkd.robust import check_weights

    check_weights(weights, stored)
    splits, model, teacher = prepare(cfg)
    load_weights(model, weights)
    if teacher is not None and teacher.t_cal is not None and run.metrics_file.exists():
        # report the T_cal this student was trained with, even if the teacher was recalibrated since
        trained_t_cal = run.metrics().get("t_cal")
        if isinstance(trained_t_cal, (int, float)) and trained_t_cal > 0:
            teacher.t_cal = float(trained_t_cal)
            if cfg.teacher_calibration == "temperature":
                teacher.temperature = teacher.t_cal
    module = CQKDModule(model, cfg, splits.info, teacher)
    trainer = make_trainer(cfg, None, progress, devices=1, strategy="auto", num_nodes=1, logger=False)
    trainer.test(module, make_loader(splits.test, 512, shuffle=False), verbose=False)
    if outputs is not None:
        outputs.update(module.test_results)
    return collect_metrics(module, cfg, splits.info, teacher)


# ------------------------------------------------------------------------------ predictions

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
    from cqkd.teacher import load_weights

    run = RunDir(path)
    stored = run.config()
    cfg = _student_config(stored)
    weights = run.require_weights()
    from cqkd.robust import check_weights

    check_weights(weights, stored)
    splits, model, _ = prepare(cfg)
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
        out[name] = {"logits": torch.cat(logits), "labels": torch.cat(labels)}
    return out


def predict_logits(path: str | os.PathLike, split: str = "test") -> dict[str, torch.Tensor]:
    """A finished run's ``{"logits", "labels"}`` on one split (see ``predict_splits``)."""
    return predict_splits(path, [split])[split]
