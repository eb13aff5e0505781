"""Evaluation under shift: a finished run's test metrics with each test image corrupted at full
resolution before the run's own degradation, written to ``RUN/shift.csv``."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch

from cqkd.calibration.metrics import all_metrics
from cqkd.core.io import atomic_write
from cqkd.core.rundir import RunDir
from cqkd.data.registry import make_loader
from cqkd.train.calibrate import run_t_cal
from cqkd.train.module import CQKDModule
from cqkd.train.predict import load_trained, student_config
from cqkd.views.augment import step_generator, to_float
from cqkd.views.corrupt import Corruption, batch_generator, default_grid

SHIFT_FILE = "shift.csv"
BATCH = 500  # fixed: the corruption noise of a batch is drawn from (corruption, severity, batch index)
COLUMNS = ("corruption", "severity", "parameter", "n", "top1", "nll", "ece", "entropy", "t_cal",
           "nll_cal", "ece_cal", "entropy_cal")


def _row(corruption: str, severity: int, parameter: float | str, logits: torch.Tensor, labels: torch.Tensor,
         t_cal: float, ece_bins: int) -> dict[str, Any]:
    raw = all_metrics(logits, labels, ece_bins)
    cal = all_metrics(logits.double() / t_cal, labels, ece_bins)
    return {"corruption": corruption, "severity": severity, "parameter": parameter, "n": int(len(labels)),
            "top1": raw["top1"], "nll": raw["nll"], "ece": raw["ece"], "entropy": raw["entropy"], "t_cal": t_cal,
            "nll_cal": cal["nll"], "ece_cal": cal["ece"], "entropy_cal": cal["entropy"]}


@torch.no_grad()
def shift_rows(path: str | os.PathLike, grid: list[Corruption] | None = None) -> list[dict[str, Any]]:
    """One row per corruption x severity (first a ``none``/0 row on the clean test split): top-1, NLL,
    ECE and entropy of the run's logits, and NLL, ECE, entropy of ``logits / T_cal`` (the run's own
    T_cal from ``calibration.json``, fitted on val first where missing).

    The view is the run's evaluation view, as ``train.predict.predict_splits``: the corruption
    acts on the full-resolution test image, then the run's degradation (its noise or JPEG range
    drawn from generators seeded by the run's seed and the batch), in eval mode."""
    trained = load_trained(path)
    cfg = student_config(trained.cfg)
    t_cal = run_t_cal(str(path), fit_if_missing=True)
    splits = trained.splits
    module = CQKDModule(trained.model, cfg, splits.info).eval()
    use_cuda = torch.cuda.is_available() and str(cfg.accelerator) in ("auto", "gpu", "cuda")
    module.to("cuda" if use_cuda else "cpu")
    batches = [(to_float(x.to(module.device)), y.cpu()) for x, y, _ in make_loader(splits.test, BATCH, shuffle=False)]
    labels = torch.cat([y for _, y in batches])
    entries: list[Corruption | None] = [None, *(grid if grid is not None else default_grid())]
    rows = []
    for corruption in entries:
        logits = []
        for i, (x, _) in enumerate(batches):
            if corruption is not None:
                x = corruption(x, batch_generator(corruption, i))
            logits.append(module.student_forward(x, step_generator(cfg.seed, i, stream=2)).float().cpu())
        z = torch.cat(logits)
        if corruption is None:
            rows.append(_row("none", 0, "", z, labels, t_cal, cfg.ece_bins))
        else:
            rows.append(_row(corruption.name, corruption.severity, corruption.parameter, z, labels, t_cal,
                             cfg.ece_bins))
    return rows


def write_shift(path: str | os.PathLike, grid: list[Corruption] | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Evaluate the run under shift (``shift_rows``) and write ``RUN/shift.csv``; returns its path and rows."""
    rows = shift_rows(path, grid)
    run = RunDir(path)
    run.claim(SHIFT_FILE)
    out = run.path / SHIFT_FILE

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})

    atomic_write(out, write)
    return out, rows
