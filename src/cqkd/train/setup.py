"""Setting up a run: its data, its student (seeded), its Lightning Trainer."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import (
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from cqkd.core import faults
from cqkd.core.config import RunConfig
from cqkd.data.registry import DatasetInfo, Splits, load_dataset
from cqkd.errors import CqkdError
from cqkd.nets.registry import build_model
from cqkd.train.checkpoints import AtomicCheckpointIO
from cqkd.train.progress import EpochProgress, make_csv_logger
from cqkd.train.trackers import TrackerLR, Tracking, make_trackers

MAX_DEVICES = 1024


def load_splits(cfg: RunConfig) -> Splits:
    """The dataset splits of ``cfg``, checked against its degradation's size."""
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.val_size, crop_size=cfg.crop_size,
                          skip_bad_images=cfg.skip_bad_images, augment=cfg.augment,
                          views_per_image=cfg.views_per_image)
    faults.point("data")
    size = cfg.degradation_spec().size
    if size > splits.info.image_size:
        raise CqkdError(f"--size {size} is larger than the {splits.info.name} images ({splits.info.image_size} px)")
    return splits


def _multi_node_launcher() -> bool:
    """True when a launcher starts this command on every node (SLURM, torchrun, LSF, or Lightning's
    NODE_RANK and MASTER_ADDR set by hand, as on Kubeflow)."""

    environments = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment)
    return any(e.detect() for e in environments) or {"NODE_RANK", "MASTER_ADDR"} <= set(os.environ)


def check_hardware(cfg: RunConfig) -> None:
    """Lightning's accelerator, devices, strategy, nodes and precision of ``cfg`` as this machine can
    run them (checked before any work; one line if not). Distributed settings that cannot start
    (no second node) fail here instead of waiting forever for their peers."""
    asked = f"--accelerator {cfg.accelerator} --devices {cfg.devices} --strategy {cfg.strategy}"
    if cfg.num_nodes > 1 and not _multi_node_launcher():
        raise CqkdError(f"--num-nodes {cfg.num_nodes} needs a launcher that starts cqkd on every node (torchrun, "
                        f"SLURM, or NODE_RANK and MASTER_ADDR set); this process runs alone on {socket.gethostname()}")
    if isinstance(cfg.devices, int) and not -1 <= cfg.devices <= MAX_DEVICES:
        raise CqkdError(f"--devices {cfg.devices}: must be -1 (all), 'auto' or a number from 1 to {MAX_DEVICES}")
    cpus = os.cpu_count() or 1
    if cfg.num_workers > 4 * cpus:
        raise CqkdError(f"--num-workers {cfg.num_workers}: this machine has {cpus} CPUs (at most {4 * cpus} workers)")
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        trainer = L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                            num_nodes=cfg.num_nodes, precision=cfg.precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:  # MisconfigurationException, ValueError, TypeError, ModuleNotFoundError, ...
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CqkdError(f"cannot run {asked} on this machine: {reason}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator" and trainer.num_devices > 4 * cpus:
        raise CqkdError(f"cannot run {asked} on this machine: {trainer.num_devices} CPU processes for {cpus} CPUs "
                        f"(at most {4 * cpus})")


def build_student(cfg: RunConfig, info: DatasetInfo) -> nn.Module:
    """The student network, initialised from ``cfg.seed`` (seeds the global generators)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_model(cfg.model, info.num_classes, info.channels, cfg.degradation_spec().output_size(info.image_size))


def is_rank_zero() -> bool:
    """True in the process that owns the run directory (before and after the Trainer exists):
    global rank 0 under torchrun/Lightning's launcher (RANK, LOCAL_RANK, NODE_RANK) and SLURM."""
    return all(int(os.environ.get(v, 0) or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def make_trainer(cfg: RunConfig, run_dir: Path | None, progress: bool = True,
                 extra_callbacks: list[Any] | None = None, resume_step: int | None = None,
                 tracking: Tracking | None = None, quiet: bool = False, **overrides: Any) -> L.Trainer:
    """A Lightning Trainer for ``cfg``, with checkpoints, CSV log, the trackers ``cfg.logger`` asks for
    (named and placed by ``tracking``) and progress in ``run_dir`` if given; ``quiet`` keeps Lightning's
    informational banners out of the terminal (from then on, in this process)."""

    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    callbacks: list[Any] = []
    logger: Any = False
    if run_dir is not None:
        # an absolute dirpath, so that a resumed run (any spelling of --out) keeps its best-checkpoint state
        callbacks.append(ModelCheckpoint(dirpath=Path(run_dir).resolve() / "checkpoints", filename="best",
                                         monitor="val/top1", mode="max", save_last=True,
                                         auto_insert_metric_name=False, enable_version_counter=False))
        # the trackers live in the process that owns the run directory (their loggers log from rank 0 only)
        trackers = make_trackers(cfg, Path(run_dir), tracking, resume=resume_step is not None) if is_rank_zero() else []
        logger = [make_csv_logger(Path(run_dir), keep_before_step=resume_step), *trackers]
        if trackers:  # the learning rate goes to the trackers only: metrics.csv keeps its columns
            callbacks.append(TrackerLR(trackers))
    callbacks.extend(extra_callbacks or [])
    if progress and run_dir is not None:
        callbacks.append(EpochProgress(Path(run_dir).name or str(run_dir)))
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
        num_nodes=cfg.num_nodes, precision=cfg.precision, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=10, enable_checkpointing=run_dir is not None,
        plugins=[AtomicCheckpointIO()],  # atomic writes; loads only with weights_only=True
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


