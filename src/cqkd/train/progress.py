"""A run's training log (metrics.csv, atomic) and its live progress (one line per epoch)."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from cqkd.core.io import atomic_write
from cqkd.core.progress import Progress, say


def make_csv_logger(run_dir: Path, keep_before_step: int | None = None) -> Any:
    """Lightning's CSVLogger writing ``metrics.csv`` atomically (whole file, temp + rename).

    Lightning's writer deletes an existing metrics.csv when it starts and appends to it in
    place; here a resumed run keeps the rows logged before ``keep_before_step`` (the resumed
    checkpoint's global step), and a kill never leaves a torn last line.
    """

    class AtomicExperimentWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            self.metrics: list[dict[str, Any]] = []
            self.metrics_keys: list[str] = []
            self.hparams: dict[str, Any] = {}
            self.log_dir = log_dir
            self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)

            self._fs = get_filesystem(log_dir)
            os.makedirs(log_dir, exist_ok=True)
            self.rows: list[dict[str, Any]] = []
            if keep_before_step is not None and os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    for row in csv.DictReader(f):
                        try:
                            if float(row.get("step") or 0) < keep_before_step:
                                self.rows.append({k: v for k, v in row.items() if v not in ("", None)})
                        except ValueError:
                            continue

        def save(self) -> None:
            if not self.metrics:
                return
            self.rows.extend(self.metrics)
            self.metrics = []
            keys = sorted(set().union(*self.rows))
            self.metrics_keys = keys
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(self.metrics_file_path, lambda f: f.write(buf.getvalue()))

    class AtomicCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
            return self._experiment

    return AtomicCSVLogger(save_dir=str(run_dir), name="", version="")


class EpochProgress(L.Callback):
    """A run's training progress: a live bar over an epoch's steps (in a terminal) and, always,
    one line per epoch: run, epoch, time, train loss, val top-1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Progress | None = None
        self.started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.monotonic()
        if trainer.is_global_zero:
            total = trainer.num_training_batches if isinstance(trainer.num_training_batches, int) else 0
            desc = f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
            self.bar = Progress(total, desc, "steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is not None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.bar.update(1, (lambda: f"loss {float(loss):.4f}") if loss is not None else "")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        m = trainer.callback_metrics
        parts = [f"{time.monotonic() - self.started:.1f} s"]
        for key, label in (("train/loss", "train loss"), ("val/top1", "val top-1")):
            if key in m:
                parts.append(f"{label} {float(m[key]):.4f}")
        say(f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: " + ", ".join(parts))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
