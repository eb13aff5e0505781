"""Figures. matplotlib is imported inside each function and drawn with the Agg canvas, never
through pyplot, so importing cqkd never touches a display or matplotlib's global state."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cqkd.calibration.metrics import calibration_errors, reliability_bins
from cqkd.core.io import atomic_write
from cqkd.errors import CqkdError

Entry = tuple[str, torch.Tensor, torch.Tensor]  # (label, logits (N, K), labels (N,))


def _save_atomic(fig, out: Path, dpi: int) -> None:
    """savefig to a temporary file in ``out``'s directory, then rename it into place."""


    FigureCanvasAgg(fig)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=dpi), mode="wb")


def reliability_diagram(entries: Sequence[Entry], out: str | os.PathLike, n_bins: int = 15,
                        title: str | None = None, dpi: int = 120) -> Path:
    """Draw a reliability diagram of one or several runs and write it as a PNG to ``out``.

    Top: accuracy against mean top-1 confidence in ``n_bins`` equal-width bins (the bins of
    ``cqkd.calibration.metrics.calibration_errors``), one line per entry, the diagonal of perfect
    calibration, and each bin's gap to the diagonal shaded (a bar from conf to acc); the legend
    gives each run's ECE. Bottom: the number of samples per bin. The file is written
    atomically (a temporary file in the same directory, then ``os.replace``).
    """


    if not entries:
        raise CqkdError("a reliability diagram needs at least one run")
    if n_bins < 1:
        raise CqkdError(f"the number of bins must be at least 1, got {n_bins}")
    fig = Figure(figsize=(6.0, 7.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
    colors = [f"C{i % 10}" for i in range(len(entries))]
    for i, (name, logits, labels) in enumerate(entries):
        logits, labels = logits.detach().cpu(), labels.detach().cpu()
        if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels) or len(labels) == 0:
            raise CqkdError(f"{name}: expected logits (N, K) and labels (N,) with N > 0, "
                            f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
        bins = reliability_bins(logits, labels, n_bins)
        ece = calibration_errors(logits, labels, n_bins)["ece"]
        count = torch.tensor(bins["count"])
        conf, acc = torch.tensor(bins["confidence"]), torch.tensor(bins["accuracy"])
        used = count > 0
        c = colors[i]
        ax.plot(conf[used].tolist(), acc[used].tolist(), marker="o", markersize=4, color=c,
                label=f"{name} (ECE {ece:.4f})")
        # the gap of each occupied bin: from the diagonal (acc = conf) to its accuracy, at its mean confidence
        ax.bar(conf[used].tolist(), (acc - conf)[used].tolist(), bottom=conf[used].tolist(), width=0.8 / n_bins,
               color=c, alpha=0.2, linewidth=0)
        hist.stairs(count.tolist(), bins["edges"], color=c, linewidth=1.2)
        hist.stairs(count.tolist(), bins["edges"], color=c, alpha=0.15, fill=True)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability ({n_bins} equal-width bins, top-1 confidence)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    hist.set_xlabel("confidence")
    hist.set_ylabel("samples per bin")
    hist.grid(alpha=0.3)
    out = Path(out)
    _save_atomic(fig, out, dpi)
    return out
