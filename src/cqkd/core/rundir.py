"""Run directories: what a run writes, atomically, and in which state it is.

Layout of a run directory::

    config.yaml        the fully resolved RunConfig (enough to rerun)
    status.json        {"state": "running" | "finished" | "failed", ...}
    metrics.json       test metrics and run facts, written last
    test_logits.pt     {"logits", "labels"} of the test split (plain tensors)
    model.safetensors  the selected (best on val) weights of the trained model
    checkpoints/       Lightning checkpoints: best.ckpt (on val), last.ckpt (epoch end),
                       step.ckpt (every N steps), interrupted.ckpt (Ctrl-C / SIGTERM); see cqkd.robust
    metrics.csv        training curves (Lightning's CSVLogger)

Every file is written to a temporary name in the same directory and renamed into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from cqkd.core.config import RunConfig
from cqkd.core.io import _UMASK, load_tensors, read_json, write_json, write_yaml
from cqkd.errors import CqkdError

STATES = ("running", "finished", "failed")


os.umask(_UMASK)


class RunDir:
    """A run directory and the files in it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    logits_file = property(lambda self: self.path / "test_logits.pt")
    weights_file = property(lambda self: self.path / "model.safetensors")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    calibration_file = property(lambda self: self.path / "calibration.json")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------- state
    @property
    def state(self) -> str | None:
        if not self.status_file.exists():
            return None
        try:
            return json.loads(self.status_file.read_text()).get("state")
        except (json.JSONDecodeError, OSError):
            return None

    @property
    def is_finished(self) -> bool:
        return self.state == "finished" and self.metrics_file.exists()

    def set_state(self, state: str, **info: Any) -> None:
        assert state in STATES, state
        write_json(self.status_file, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})

    def prepare(self, cfg: RunConfig, force: bool = False, resume: bool = False) -> None:
        """Create the directory for a new run (refusing to overwrite a finished one)."""
        if self.path.exists() and not self.path.is_dir():
            raise CqkdError(f"--out {str(self.path)!r} exists and is not a directory")
        if self.is_finished and not force:
            raise CqkdError(f"--out {str(self.path)!r} holds a finished run; pass --force to overwrite it")
        if not resume and self.state in ("running", "failed"):
            state, note = effective_state(self)
            if state == "running":
                raise CqkdError(f"--out {str(self.path)!r} holds a run that is still running ({note}); "
                                "choose another directory or stop that run")
            has_ckpt = self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.glob("*.ckpt"))
            if has_ckpt and not force:
                raise CqkdError(f"--out {str(self.path)!r} holds an unfinished run with checkpoints ({note}); "
                                "pass --resume to continue it or --force to start it over")
        if not resume and self.path.exists() and any(self.path.iterdir()) and not force and self.state is None:
            raise CqkdError(f"--out {str(self.path)!r} is not empty and is not a cqkd run; choose another directory")
        if not resume and (force or self.state in ("running", "failed")):
            for f in (self.metrics_file, self.logits_file, self.weights_file, self.calibration_file,
                      self.path / "metrics.csv"):
                f.unlink(missing_ok=True)
            if self.checkpoint_dir.exists():
                for f in self.checkpoint_dir.iterdir():
                    f.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        write_yaml(self.config_file, cfg.to_dict())
        self.set_state("running", pid=os.getpid(), host=socket.gethostname(), resumed=resume)

    # ---------------------------------------------------------------- contents
    def config(self) -> RunConfig:
        if not self.config_file.exists():
            raise CqkdError(f"{str(self.path)!r} is not a cqkd run directory (no config.yaml)")
        try:
            raw = yaml.safe_load(self.config_file.read_text())
        except yaml.YAMLError as e:
            raise CqkdError(f"{self.config_file} is not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise CqkdError(f"{self.config_file} is not a mapping")
        return RunConfig.from_dict(raw, where=str(self.config_file))

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file)

    def test_logits(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.logits_file)

    def require_weights(self) -> Path:
        if not self.weights_file.exists():
            hint = " (the run is still running or failed)" if self.state in ("running", "failed") else ""
            raise CqkdError(f"run {str(self.path)!r} has no trained model ({self.weights_file.name} missing){hint}")
        return self.weights_file


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_state(run: RunDir) -> tuple[str | None, str]:
    """(state, note). A "running" run whose process is gone on this host is reported as failed
    ("stale"); elsewhere (another host) it cannot be checked and stays "running"."""
    if not run.status_file.exists():
        return None, "no status.json"
    try:
        status = json.loads(run.status_file.read_text())
    except (OSError, ValueError):
        return "failed", "unreadable status.json"
    state = status.get("state")
    if state == "running":
        pid, host = status.get("pid"), status.get("host")
        same_host = host is None or host == socket.gethostname()
        if isinstance(pid, int) and same_host and (pid == os.getpid() or not pid_alive(pid)):
            return "failed", f"stale: process {pid} is gone" if pid != os.getpid() else "stale: left running by this process"
        return "running", f"pid {pid}" if pid else ""
    if state == "failed":
        return "failed", str(status.get("error", ""))
    return state, ""


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
            raw = yaml.safe_load(config.read_text())
            if isinstance(raw, dict):
                row.update(kind=raw.get("kind"), model=raw.get("model"), size=raw.get("size"))
        except (OSError, yaml.YAMLError):
            row["note"] = (note + "; " if note else "") + "unreadable config.yaml"
        if state == "finished" and run.metrics_file.exists():
            try:
                m = json.loads(run.metrics_file.read_text())
                row.update(top1=m.get("top1"), ece=m.get("ece"), size=m.get("size", row["size"]))
            except (OSError, ValueError):
                row["note"] = "unreadable metrics.json"
        rows.append(row)
    return rows
