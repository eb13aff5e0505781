"""Calibrating a finished run: fit T_cal on a held-out split of its predictions and save it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cqkd.calibration.metrics import calibration_errors, nll, top1
from cqkd.calibration.scaling import TemperatureScaler, _checked_t_cal, read_calibration
from cqkd.core.io import check_output_file, write_json
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError
from cqkd.nets.teacher import file_digest
from cqkd.train.predict import predict_splits


def _before_after(logits: torch.Tensor, labels: torch.Tensor, t_cal: float, ece_bins: int) -> dict[str, float]:
    before = calibration_errors(logits, labels, ece_bins)
    after = calibration_errors(logits.double() / t_cal, labels, ece_bins)
    return {"n": int(len(labels)), "top1": top1(logits, labels),
            "nll_before": nll(logits, labels), "nll_after": nll(logits.double() / t_cal, labels),
            "ece_before": before["ece"], "ece_after": after["ece"]}


def calibrate_run(run_path: str | os.PathLike, split: str = "val", ece_bins: int = 15,
                  progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Fit T_cal for the run in ``run_path`` on ``split`` and write ``calibration.json`` (its schema:
    ``cqkd.calibration.scaling``).

    The logits are the run's own on its evaluation view (un-augmented, degraded as the run
    was; ``cqkd.train.predict.predict_logits``), from its saved weights. Returns (and writes) the
    fitted ``t_cal``, the split used, and NLL / ECE before and after scaling on val and test.
    Fitting on the test split is refused: T_cal would be tuned on the data it is judged on.
    ``quiet``: no Lightning banners.
    """
    if split == "test":
        raise CqkdError("calibrating on the test split is not allowed: T_cal would be fitted on the data "
                        "it is evaluated on; use --split val")
    if ece_bins < 1:
        raise CqkdError(f"--ece-bins must be at least 1, got {ece_bins}")
    run = RunDir(run_path)
    if not run.is_run:
        raise CqkdError(f"{str(run.path)!r} is not a cqkd run directory")
    cfg = run.config()
    weights = run.require_weights()
    check_output_file(run.calibration_file, "calibration")
    names = [split] + [s for s in ("val", "test") if s != split]
    if progress:
        print(f"computing the logits of {run.path} on {', '.join(names)} ...", file=sys.stderr, flush=True)
    outputs = predict_splits(run.path, names, quiet=quiet)
    fit = outputs[split]
    scaler = TemperatureScaler().fit(fit["logits"], fit["labels"])
    t_cal = float(scaler.t_cal)  # type: ignore[arg-type]
    result: dict[str, Any] = {
        **scaler.to_dict(), "split": split, "ece_bins": ece_bins,  # the schema of cqkd.calibration.scaling
        "metrics": {s: _before_after(outputs[s]["logits"], outputs[s]["labels"], t_cal, ece_bins)
                    for s in ("val", "test")},
        "weights_digest": file_digest(weights), "model": cfg.model, "dataset": cfg.dataset,
        "degradation": cfg.degradation_spec().spec(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if split not in ("val", "test"):
        result["metrics"][split] = _before_after(fit["logits"], fit["labels"], t_cal, ece_bins)
    with run.lock(wait=True):
        run.claim(run.calibration_file.name)
        write_json(run.calibration_file, result)
    return result


def run_t_cal(run_path: str, fit_if_missing: bool = True) -> float:
    """T_cal of the (teacher) run in ``run_path``, from its ``calibration.json``.

    If the file is absent, or was fitted for other weights than the run's current
    ``model.safetensors``, T_cal is fitted on the val split first (``calibrate_run``) when
    ``fit_if_missing``; otherwise that is an error.
    """
    run = RunDir(run_path)
    data = read_calibration(run_path)
    if data is not None:
        digest = data.get("weights_digest")
        if digest is None or digest == file_digest(run.require_weights()):
            if data.get("split", "val") != "val":  # the README promises a T_cal held out of training
                raise CqkdError(f"{run.calibration_file}: T_cal was fitted on the {data.get('split')} split; "
                                f"distillation uses one fitted on val: run `cqkd calibrate {run_path}`")
            return _checked_t_cal(data, run_path)
        reason = f"{run.calibration_file} was fitted for other weights than {run.weights_file.name}"
    else:
        reason = f"{run.calibration_file} does not exist"
    if not fit_if_missing:
        raise CqkdError(f"no temperature for {str(Path(run_path))!r}: {reason}; run `cqkd calibrate {run_path}`")
    return _checked_t_cal(calibrate_run(run_path, "val", ece_bins=run.config().ece_bins, progress=False), run_path)
