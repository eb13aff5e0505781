"""Running a run: ``prepare`` (data, teacher and its T_cal, seeded student), ``fit_run`` (train, test,
write the run directory) and ``evaluate_run``; the training step itself is ``train.module``."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import save
from torch import nn

from cqkd import __version__
from cqkd.calibration.metrics import all_metrics, mean_kl
from cqkd.calibration.plots import reliability_diagram
from cqkd.core.config import RunConfig
from cqkd.core.io import atomic_write, refuse_symlink, save_tensors, write_json
from cqkd.core.rundir import RunDir
from cqkd.data.folder import skipped_files
from cqkd.data.registry import DatasetInfo, Splits, check_data_dir, make_loader
from cqkd.distill.methods import check_method
from cqkd.errors import CqkdError, RunFailed, RunInterrupted
from cqkd.nets.registry import count_flops, count_params
from cqkd.nets.teacher import Teacher, load_teacher, load_weights
from cqkd.train.calibrate import run_t_cal
from cqkd.train.checkpoints import (
    check_teacher,
    check_weights,
    checkpoint_step,
    resume_checkpoint,
)
from cqkd.train.guard import RunGuard, SigtermOutsideFit, shuffle_generator
from cqkd.train.module import CQKDModule
from cqkd.train.predict import run_on_split
from cqkd.train.setup import (
    build_student,
    check_hardware,
    is_rank_zero,
    load_splits,
    make_trainer,
)
from cqkd.train.trackers import SafeLogger, Tracking, check_trackers, log_final


def prepare(cfg: RunConfig, trained_t_cal: float | None = None) -> tuple[Splits, nn.Module, Teacher | None]:
    """Load data, teacher (frozen, with its T_cal where asked for) and student for ``cfg``.

    T_cal is resolved here, once: the teacher's fitted value, or ``trained_t_cal`` (the value a
    finished student was trained with, which ``evaluate_run`` reports even if the teacher was
    recalibrated since).

    The student is initialised from ``cfg.seed`` (the global generators are seeded last, so that
    the initialisation does not depend on whatever loading the teacher drew from them)."""
    splits = load_splits(cfg)
    info = splits.info
    degradation = cfg.degradation_spec()
    teacher = None
    if cfg.kind == "distill":
        teacher = load_teacher(cfg.teacher, info, cfg.teacher_model, cfg.teacher_weights)
        if degradation.size > teacher.input_size:
            raise CqkdError(f"--size {degradation.size} is larger than the teacher's input ({teacher.input_size} px)")
        method = check_method(cfg.method)
        if cfg.teacher_topk and cfg.teacher_topk < info.num_classes and method.needs.full_distribution:
            raise CqkdError(f"--method {method.name} needs every class's teacher probability; "
                            f"--teacher-topk {cfg.teacher_topk} keeps only {cfg.teacher_topk} of {info.num_classes}")
        if cfg.teacher_calibration == "temperature" or cfg.temperature == "calibrated":
            if not Path(cfg.teacher or "").is_dir():
                raise CqkdError("teacher calibration needs a teacher run directory (--teacher RUN_DIR)")
            fitted = run_t_cal(cfg.teacher, fit_if_missing=True)
            teacher.t_cal = trained_t_cal if trained_t_cal is not None else fitted
    return splits, build_student(cfg, info), teacher


def check_run(cfg: RunConfig, out: str | os.PathLike, force: bool = False, resume: bool = False) -> None:
    """Everything about a run that can be checked before any work: ``--out`` (an empty or new
    directory, or a cqkd run whose state allows it; never the teacher or inside it; checked by
    the process that writes it, global rank 0), the numbers (``cfg`` is validated), the
    hardware, the data directory. Creates nothing."""
    if resume and force:
        raise CqkdError("--resume and --force contradict each other: --resume continues the run in --out, "
                        "--force starts it over")
    run = RunDir(out)
    check_method(cfg.method)
    if cfg.kind == "distill" and cfg.teacher:
        o, t = run.path.resolve(), Path(cfg.teacher).resolve()
        if o == t or t in o.parents or o in t.parents:
            raise CqkdError(f"--out {str(out)!r} overlaps the teacher {cfg.teacher!r}; a student's run directory "
                            "must lie outside its teacher (and not contain it)")
        if cfg.teacher_cache != "off" and Path(cfg.teacher).is_dir():
            refuse_symlink(Path(cfg.teacher) / "cache")  # the cache build and its cleanup stay inside the teacher
    if is_rank_zero():  # the other ranks start after rank 0 has prepared (and locked) the run
        run.check_out(force, resume)
    check_hardware(cfg)
    check_data_dir(cfg.data_dir)
    check_trackers(cfg)


def fit_run(cfg: RunConfig, out: str | os.PathLike, force: bool = False, progress: bool = True,
            resume: bool = False, quiet: bool = False, tracking: Tracking | None = None) -> dict[str, Any]:
    """Train (supervised or CQKD) as configured, writing the run directory ``out``.

    With ``resume``, continue the interrupted run in ``out`` from its most advanced checkpoint
    (see ``cqkd.train.checkpoints``); its stored configuration must match ``cfg``. The process
    holds the run's lock (``cqkd.core.lock``) from the moment it writes there until it returns.
    ``tracking`` names, tags and places the run in the trackers of ``cfg.logger`` (a sweep passes it).
    Returns the metrics written to ``metrics.json``. ``quiet``: no Lightning banners.
    """
    check_run(cfg, out, force, resume)
    run = RunDir(out)
    ckpt_path = resume_checkpoint(run, cfg, check_state=is_rank_zero()) if resume else None  # before any work
    splits, model, teacher = prepare(cfg)
    if ckpt_path is not None and teacher is not None:
        check_teacher(ckpt_path, teacher.digest, teacher.path)
    if not is_rank_zero():
        return _fit(run, cfg, splits, model, teacher, ckpt_path, progress, resume, quiet, tracking)
    run.prepare(cfg, force=force, resume=resume)
    try:
        if resume and ckpt_path is None:
            print(f"cqkd: {out} has no checkpoint yet; starting it from the beginning", file=sys.stderr)
        return _fit(run, cfg, splits, model, teacher, ckpt_path, progress, resume, quiet, tracking)
    finally:
        run.release()


def _fit(run: RunDir, cfg: RunConfig, splits: Splits, model: nn.Module, teacher: Teacher | None,
         ckpt_path: Path | None, progress: bool, resume: bool, quiet: bool = False,
         tracking: Tracking | None = None) -> dict[str, Any]:
    """Fit, test and save a prepared run; mark it failed (with the reason) if that does not end."""

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
            trainer = make_trainer(cfg, run.path, progress, extra_callbacks=[guard], quiet=quiet,
                                   resume_step=checkpoint_step(ckpt_path) if ckpt_path else None,
                                   tracking=tracking)
            val_loader = make_loader(splits.val, eval_batch, shuffle=False, num_workers=cfg.num_workers,
                                     pin_memory=pin)
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if trainer.interrupted:
                raise KeyboardInterrupt
            if guard.stop_signal or trainer.received_sigterm:  # asked to stop during the last validation
                raise RunInterrupted(guard.stop_signal or "SIGTERM", trainer.global_step, None)
            module.load_teacher_memo(splits.test)  # the teacher's test outputs, if a sibling saved them
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
                log_final([lg for lg in trainer.loggers if isinstance(lg, SafeLogger)], cfg, metrics,
                          trainer.global_step)
            return metrics
        except RunInterrupted as e:
            step = e.step if e.step is not None else (trainer.global_step if trainer is not None else 0)
            _mark_failed(run, "interrupted", signal=e.signal_name, step=step, checkpoint=e.checkpoint)
            raise RunInterrupted(e.signal_name, step, e.checkpoint) from None
        except SIGTERMException:
            saved = guard.saved_interrupt
            step = trainer.global_step if trainer is not None else 0
            _mark_failed(run, "interrupted", signal="SIGTERM", step=step, checkpoint=saved)
            raise RunInterrupted("SIGTERM", step, saved) from None
        except FloatingPointError as e:
            _mark_failed(run, f"diverged: {e}")
            raise RunFailed(f"training diverged: {e}; run {str(run.path)!r} marked failed "
                            "(lower --lr, or check the data)") from None
        except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning turns it into sys.exit(1)
            _mark_failed(run, "interrupted")
            raise KeyboardInterrupt from None
        except CqkdError as e:  # e.g. a full disk: one line naming the file
            _mark_failed(run, str(e))
            raise
        except BaseException as e:
            _mark_failed(run, f"{type(e).__name__}: {e}")
            raise


def _mark_failed(run: RunDir, reason: str, **info: Any) -> None:
    """Record why the run stopped, if the disk lets us (never masking the reason itself)."""
    if is_rank_zero():
        try:
            run.set_state("failed", error=reason, **info)
        except CqkdError:
            pass


def _pin_memory(cfg: RunConfig) -> bool:
    return cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def data_facts(cfg: RunConfig, splits: Splits) -> dict[str, Any]:
    """What the run's data looked like beyond the config (views drawn by the loader, skipped
    unreadable files). A collective when images are skipped: call it on every rank."""
    facts: dict[str, Any] = dict(splits.extra) if splits.extra else {}
    if cfg.skip_bad_images:

        skipped = skipped_files(splits)
        facts.update(skipped_images=len(skipped), skipped_files=skipped[:100])
    return facts


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def collect_metrics(module: CQKDModule, cfg: RunConfig, info: DatasetInfo, teacher: Teacher | None) -> dict[str, Any]:
    """The run's test metrics with its settings, and for a distillation the teacher's metrics and source."""
    res = module.test_results
    degradation = module.step.degradation
    size = degradation.output_size(info.image_size)
    metrics: dict[str, Any] = all_metrics(res["logits"], res["labels"], cfg.ece_bins)
    metrics.update(
        kind=cfg.kind, dataset=cfg.dataset, model=cfg.model, size=degradation.size,
        input_size=size, degradation=degradation.spec(), params=count_params(module.model),
        flops=count_flops(module.model, info.channels, size), epochs=cfg.epochs, seed=cfg.seed,
        train_samples=cfg.train_samples, cqkd_version=__version__, config_digest=cfg.digest(),
    )
    if teacher is not None:
        metrics.update(
            temperature=module.step.temperature, temperature_mode="calibrated" if cfg.temperature == "calibrated" else "fixed",
            alpha=cfg.alpha, teacher=teacher.path, teacher_digest=teacher.digest, teacher_model=teacher.model_name,
            teacher_calibration=cfg.teacher_calibration, t_cal=teacher.t_cal,
            teacher_temperature_applied=module.step.t_cal,
            teacher_metrics=_summary(all_metrics(res["teacher_logits"], res["labels"], cfg.ece_bins)),
            teacher_lr_metrics=_summary(all_metrics(res["teacher_lr_logits"], res["labels"], cfg.ece_bins)),
            kl_teacher_student=mean_kl(res["teacher_logits"], res["logits"]),
        )
        if not module.uses_teacher:
            metrics.update(teacher_source="none", teacher_source_reason=f"method {cfg.method}: no teacher in training")
        elif module.source is not None:
            metrics.update(module.source.describe())
        elif info.loader_augments:
            metrics.update(teacher_cache=cfg.teacher_cache, teacher_source="online",
                           teacher_source_reason="the loader draws random crops: no per-image views to cache")
    return metrics


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "nll", "brier", "ece", "entropy", "confidence")
    return {k: m[k] for k in keys if k in m}


def save_outputs(run: RunDir, module: CQKDModule, metrics: dict[str, Any]) -> None:
    """Write the run's test logits, weights, metrics and reliability diagram."""

    res = module.test_results
    save_tensors(run.logits_file, {k: v for k, v in res.items() if k != "idx"})
    state = {k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items()}
    meta = {"cqkd_version": __version__, "model": module.cfg.model, "config_digest": module.cfg.digest()}
    atomic_write(run.weights_file, lambda f: f.write(save(state, metadata=meta)), mode="wb")
    write_json(run.metrics_file, metrics)
    try:  # a figure is a convenience: failing to draw it must not lose the run

        reliability_diagram([(run.path.name, res["logits"], res["labels"])], run.path / "reliability.png",
                            n_bins=module.cfg.ece_bins)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"could not draw {run.path / 'reliability.png'}: {type(e).__name__}: {e}", stacklevel=2)
    run.set_state("finished")


def evaluate_run(path: str | os.PathLike, progress: bool = True, outputs: dict[str, torch.Tensor] | None = None,
                 quiet: bool = False, **overrides: Any) -> dict[str, Any]:
    """Recompute a finished run's test metrics from its saved weights (through ``run_on_split``).

    ``outputs``, if given, receives the test tensors (``logits``, ``labels``, ...)."""
    run = RunDir(path)
    stored = run.config()
    cfg = stored.replace(**overrides) if overrides else stored
    weights = run.require_weights()
    check_weights(weights, stored)
    check_hardware(cfg.replace(devices=1, strategy="auto", num_nodes=1))
    recorded = run.metrics().get("teacher_digest") if run.metrics_file.exists() else None
    if cfg.kind == "distill" and cfg.teacher and not os.path.lexists(cfg.teacher):
        where = "" if os.path.isabs(cfg.teacher) else " (relative to the current directory)"
        raise CqkdError(f"the teacher recorded in {run.config_file}, {cfg.teacher!r}{where}, does not exist "
                        "(moved or deleted?); put it back there to evaluate this student")
    calibrated = cfg.kind == "distill" and (cfg.teacher_calibration == "temperature" or cfg.temperature == "calibrated")
    trained = run.metrics().get("t_cal") if calibrated and run.metrics_file.exists() else None
    trained_t_cal = float(trained) if isinstance(trained, (int, float)) and trained > 0 else None
    splits, model, teacher = prepare(cfg, trained_t_cal)
    if teacher is not None and isinstance(recorded, str) and recorded and teacher.digest != recorded:
        raise CqkdError(f"the teacher at {cfg.teacher!r} is not the one {str(run.path)!r} was distilled from "
                        f"(weights digest {teacher.digest}, recorded {recorded}); put that teacher back there")
    load_weights(model, weights)
    module = CQKDModule(model, cfg, splits.info, teacher)
    results = run_on_split(module, splits.test, progress, test_split=True, quiet=quiet)
    if outputs is not None:
        outputs.update(results)
    return collect_metrics(module, cfg, splits.info, teacher)
