"""Predicting on image files: batches, unreadable files, CSV / JSON Lines output."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cqkd.core.io import write_text
from cqkd.core.progress import Progress
from cqkd.data.folder import BadImageError
from cqkd.deploy.images import find_images
from cqkd.deploy.predictor import Predictions, Predictor
from cqkd.errors import CqkdError, unknown_name

FORMATS = ("csv", "jsonl")


@dataclass
class FilePredictions:
    """Predictions for the readable files, and the unreadable ones that were skipped."""

    paths: list[str]
    predictions: Predictions
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], batch_size: int = 256,
                  calibrated: bool = True, skip_bad_images: bool = False, progress: bool = False) -> FilePredictions:
    """Predict every image file named by ``inputs`` (directories walked recursively).

    An unreadable file raises ``CqkdError`` naming it, or with ``skip_bad_images`` is skipped
    and listed in ``skipped``; if no file at all can be read, that is an error too.
    """
    if batch_size < 1:
        raise CqkdError(f"--batch-size must be at least 1, got {batch_size}")
    files = find_images(inputs)
    paths: list[str] = []
    logits: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []

    def load(path: Path) -> torch.Tensor | BadImageError:
        try:
            return predictor.prepare(path)
        except BadImageError as e:
            return e

    show = progress and len(files) > batch_size
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        with Progress(len(files), "predict", "images", show) as bar:
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                ok, images = [], []
                for path, image in zip(chunk, pool.map(load, chunk)):
                    if isinstance(image, BadImageError):
                        if not skip_bad_images:
                            raise CqkdError(f"{image}; pass --skip-bad-images to skip unreadable files") from None
                        skipped.append((str(path), str(image)))
                    else:
                        ok.append(str(path))
                        images.append(image)
                if images:
                    paths += ok
                    logits.append(predictor.forward_batches(torch.cat(images), batch_size))
                bar.update(len(chunk))
    finally:  # an error or a signal: drop the queued decodes instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
    if not paths:
        raise CqkdError(f"none of the {len(files)} image files could be read (first: {skipped[0][1]})")
    return FilePredictions(paths, predictor.probabilities(torch.cat(logits), calibrated), skipped)


def format_predictions(result: FilePredictions, top_k: int = 5, fmt: str = "csv") -> str:
    """One row per image: the path and the ``top_k`` class names with their probabilities."""
    if fmt not in FORMATS:
        raise unknown_name("output format", fmt, FORMATS)
    top = result.predictions.top(top_k)
    k = len(top[0])
    buf = io.StringIO()
    if fmt == "csv":
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")])
        for path, row in zip(result.paths, top):
            writer.writerow([path] + [v for name, p in row for v in (name, f"{p:.6g}")])
    else:
        for path, row in zip(result.paths, top):
            buf.write(json.dumps({"path": path, "classes": [n for n, _ in row],
                                  "probs": [float(f"{p:.6g}") for _, p in row]}) + "\n")
    return buf.getvalue()


def write_predictions(text: str, out: str | os.PathLike, force: bool = False) -> None:
    """Write ``text`` to ``out`` atomically; an existing file only with ``force``."""
    out = Path(out)
    if out.is_dir():
        raise CqkdError(f"--out {str(out)!r} is a directory; name a file")
    if out.exists() and not force:
        raise CqkdError(f"--out {str(out)!r} exists; pass --force to overwrite it")
    write_text(out, text)
