"""Listing run directories: one row per run with its state and headline metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cqkd.core.io import read_yaml
from cqkd.core.rundir import RunDir, effective_state
from cqkd.errors import CqkdError


def list_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per run directory under ``root`` (``root`` itself included): its path relative to
    ``root``, state, note, kind, model, size, top1, ece. Unreadable files leave blanks."""
    root = Path(root)
    if not root.is_dir():
        raise CqkdError(f"{str(root)!r} is not a directory")
    rows = []
    for config in sorted(root.rglob("config.yaml")):
        run = RunDir(config.parent)
        state, note = effective_state(run)
        row: dict[str, Any] = {"run": str(run.path.relative_to(root)) or ".", "state": state or "?", "note": note,
                               "kind": None, "model": None, "size": None, "top1": None, "ece": None}
        try:
            raw = read_yaml(config)
            row.update(kind=raw.get("kind"), model=raw.get("model"), size=raw.get("size"))
        except CqkdError:
            row["note"] = (note + "; " if note else "") + "unreadable config.yaml"
        if state == "finished" and run.metrics_file.exists():
            try:
                m = run.metrics()
                row.update(top1=m.get("top1"), ece=m.get("ece"), size=m.get("size", row["size"]))
            except CqkdError:
                row["note"] = "unreadable metrics.json"
        rows.append(row)
    return rows
