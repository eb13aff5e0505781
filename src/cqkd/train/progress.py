"""Training logs: the atomic CSV log of a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cqkd.core.io import atomic_write


def make_csv_logger(run_dir: Path, keep_before_step: int | None = None) -> Any:
    """Lightning's CSVLogger writing ``metrics.csv`` atomically (whole file, temp + rename).

    Lightning's writer deletes an existing metrics.csv when it starts and appends to it in
    place; here a resumed run keeps the rows logged before ``keep_before_step`` (the resumed
    checkpoint's global step), and a kill never leaves a torn last line.
    """
    import csv
    import io

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AtomicExperimentWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            self.metrics: list[dict[str, Any]] = []
            self.metrics_keys: list[str] = []
            self.hparams: dict[str, Any] = {}
            self.log_dir = log_dir
            self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
            from lightning.fabric.utilities.cloud_io import get_filesystem

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
