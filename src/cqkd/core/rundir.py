"""Run directories: what a run writes, atomically, and in which state it is.

Details: docs/architecture.md.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from cqkd import __version__
from cqkd.core.config import RunConfig
from cqkd.core.io import (
    check_creatable,
    load_tensors,
    read_json,
    read_yaml,
    write_json,
    write_yaml,
)
from cqkd.core.lock import Lock, acquire, holds, is_held
from cqkd.errors import CqkdError

STATES = ("running", "finished", "failed")
MARKER = ".cqkd-run.json"
LOCK = ".cqkd.lock"
CHECKPOINT_FILES = tuple(f"checkpoints/{n}" for n in ("best.ckpt", "last.ckpt", "step.ckpt", "interrupted.ckpt"))
OUTPUT_FILES = ("metrics.json", "test_logits.pt", "model.safetensors", "calibration.json", "metrics.csv",
                "reliability.png", *CHECKPOINT_FILES)  # what starting a run over removes
RUN_FILES = (MARKER, LOCK, "config.yaml", "status.json", *OUTPUT_FILES)  # every file a run may write



class RunDir:
    """A run directory and the files in it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock: Lock | None = None

    config_file = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    logits_file = property(lambda self: self.path / "test_logits.pt")
    weights_file = property(lambda self: self.path / "model.safetensors")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    calibration_file = property(lambda self: self.path / "calibration.json")
    marker_file = property(lambda self: self.path / MARKER)
    lock_file = property(lambda self: self.path / LOCK)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------- state
    def status(self) -> dict[str, Any]:
        """status.json (a mapping with a known state), {} when there is none; CqkdError when unreadable."""
        if not self.status_file.exists():
            return {}
        status = read_json(self.status_file)
        if status.get("state") not in STATES:
            raise CqkdError(f"{self.status_file}: state={status.get('state')!r} is not one of {', '.join(STATES)}")
        pid, host = status.get("pid"), status.get("host")
        if not (pid is None or (isinstance(pid, int) and not isinstance(pid, bool))) or not isinstance(host or "", str):
            raise CqkdError(f"{self.status_file}: pid={pid!r}, host={host!r} are not a process id and a host name")
        return status

    @property
    def state(self) -> str | None:
        """The recorded state; None without status.json, "failed" when it cannot be read."""
        try:
            return self.status().get("state")
        except CqkdError:
            return "failed"

    @property
    def is_finished(self) -> bool:
        """Whether the run finished and wrote its ``metrics.json``."""
        return self.state == "finished" and self.metrics_file.exists()

    def set_state(self, state: str, **info: Any) -> None:
        """Record the run's ``state`` (with a timestamp and ``info``) in its status file."""
        assert state in STATES, state
        write_json(self.status_file, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})

    # ---------------------------------------------------------------- ownership
    @property
    def is_run(self) -> bool:
        """A cqkd run: it has the marker, or (written before the marker) config.yaml and status.json."""
        return self.marker_file.exists() or (self.config_file.exists() and self.status_file.exists())

    def owned(self) -> frozenset[str]:
        """The files (paths relative to the run) that cqkd wrote here and may replace or delete."""
        if not self.marker_file.exists():
            return frozenset(RUN_FILES) if self.is_run else frozenset()
        marker = read_json(self.marker_file)
        files = marker.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and _is_inside(f) for f in files):
            raise CqkdError(f"{self.marker_file} is not a cqkd run marker (files must be a list of relative paths)")
        return frozenset(files)

    def claim(self, *names: str) -> None:
        """Record that cqkd writes ``names`` (relative paths) in this run; refuse a file of that name it did not write."""
        if not self.is_run:
            raise CqkdError(f"{str(self.path)!r} is not a cqkd run directory")
        owned = self.owned()
        new = [n for n in names if n not in owned]
        for name in new:
            if os.path.lexists(self.path / name):
                raise CqkdError(f"{self.path / name} was not written by cqkd; refusing to overwrite it "
                                "(move it away, or choose another directory)")
        if new or not self.marker_file.exists():  # (a run written before the marker gets one)
            self._write_marker({*owned, *new})

    def _write_marker(self, names: set[str] | tuple[str, ...]) -> None:
        write_json(self.marker_file, {"cqkd_run": 1, "cqkd_version": __version__, "files": sorted({*names, MARKER})})

    def check_out(self, force: bool = False, resume: bool = False) -> None:
        """Refuse (one line) to start or resume a run here unless this is a cqkd run or an empty
        (or new) directory and its state allows it. Writes nothing."""
        where = f"--out {str(self.path)!r}"
        if not self.path.exists():
            if resume:
                raise CqkdError(f"--resume: {str(self.path)!r} holds no run to resume (it does not exist); "
                                "drop --resume to start one")
            check_creatable(self.path, "--out", str(self.path))
            return
        if not self.path.is_dir():
            raise CqkdError(f"{where} exists and is not a directory")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise CqkdError(f"{where} is not writable")
        if not self.is_run:
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK)
            if others:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise CqkdError(f"{where} is not empty and is not a cqkd run (it holds {shown}); cqkd writes only "
                                "into an empty directory or its own run: choose another directory")
            if resume:
                raise CqkdError(f"--resume: {str(self.path)!r} holds no run to resume; drop --resume to start one")
            return
        self._check_files()
        self._check_state(force, resume)

    def _check_files(self) -> None:
        """No symbolic link out of the run where cqkd writes, no file of its names that it did not write."""
        if self.checkpoint_dir.is_symlink():
            raise CqkdError(f"{self.checkpoint_dir} is a symbolic link; cqkd writes only inside the run directory "
                            "(replace it with a directory)")
        owned = self.owned()
        for name in RUN_FILES:
            if name not in owned and os.path.lexists(self.path / name):
                raise CqkdError(f"{self.path / name} was not written by cqkd; refusing to overwrite it "
                                "(move it away, or choose another directory)")

    def _check_state(self, force: bool, resume: bool) -> None:
        where = f"--out {str(self.path)!r}"
        if self.is_finished and not force and not resume:
            raise CqkdError(f"{where} holds a finished run; pass --force to overwrite it")
        state, note = effective_state(self)
        if state == "running":
            raise CqkdError(f"{where} holds a run that is still running ({note}); choose another directory or stop "
                            "that run")
        if resume:
            if not self.config_file.exists():
                raise CqkdError(f"--resume: {str(self.path)!r} holds no run to resume (no config.yaml); "
                                "drop --resume to start one")
            return
        if state == "failed" and not force and any(self.checkpoint_dir.glob("*.ckpt")):
            raise CqkdError(f"{where} holds an unfinished run with checkpoints ({note}); "
                            "pass --resume to continue it or --force to start it over")

    def lock(self, wait: bool = False) -> Lock:
        """Take the run's lock (creating the directory); one line naming the holder if another process has it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return acquire(self.lock_file, f"run directory {str(self.path)!r}", wait=wait)
        except OSError as e:
            raise CqkdError(f"cannot write into {str(self.path)!r}: {e.strerror or e}") from None

    def prepare(self, cfg: RunConfig, force: bool = False, resume: bool = False) -> None:
        """Lock the directory (until ``release``), check it again under the lock, remove what a
        start-over replaces and the temporary files of a killed process, write config and state."""
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # deepest first
        self._lock = self.lock()
        try:
            self.check_out(force, resume)
        except BaseException:
            self.release()
            if created:  # leave the file system as it was
                self.lock_file.unlink(missing_ok=True)
                for d in created:
                    d.rmdir()
            raise
        if self.is_run:
            self.claim(*RUN_FILES)
        else:
            self._write_marker(RUN_FILES)
        self.remove_temporary()
        if not resume and (force or self.state in ("running", "failed")):
            self.remove_owned(OUTPUT_FILES)
        write_yaml(self.config_file, cfg.to_dict())
        self.set_state("running", pid=os.getpid(), host=socket.gethostname(), resumed=resume)

    def release(self) -> None:
        """Release the lock taken by ``prepare``."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def remove_owned(self, names: tuple[str, ...] | None = None) -> None:
        """Delete the owned files ``names`` (default: every owned output), never beyond a symbolic link."""
        owned = self.owned()
        for name in names or OUTPUT_FILES:
            if name in owned:
                _unlink_inside(self.path, name)

    def remove_temporary(self) -> None:
        """Delete the temporary files (``.NAME.*.tmp``) that a killed writer left of owned files."""
        for name in self.owned():
            parent = Path(name).parent
            if (self.path / parent).is_dir() and not (self.path / parent).is_symlink():
                for tmp in (self.path / parent).glob(f".{Path(name).name}.*.tmp"):
                    _unlink_inside(self.path, str(parent / tmp.name))

    # ---------------------------------------------------------------- contents
    def config(self) -> RunConfig:
        """The run's validated config (``config.yaml``); ``CqkdError`` if the directory has none."""
        if not self.config_file.exists():
            raise CqkdError(f"{str(self.path)!r} is not a cqkd run directory (no config.yaml)")
        raw = read_yaml(self.config_file)
        return RunConfig.from_dict(raw, where=str(self.config_file))

    def metrics(self) -> dict[str, Any]:
        """The run's test metrics (``metrics.json``)."""
        return read_json(self.metrics_file)

    def test_logits(self) -> dict[str, torch.Tensor]:
        """The run's test logits and labels (``test_logits.pt``)."""
        return load_tensors(self.logits_file)

    def require_weights(self) -> Path:
        """The path of the run's trained weights; ``CqkdError`` if they are missing."""
        if not self.weights_file.exists():
            hint = " (the run is still running or failed)" if self.state in ("running", "failed") else ""
            raise CqkdError(f"run {str(self.path)!r} has no trained model ({self.weights_file.name} missing){hint}")
        return self.weights_file


OUTPUTS_MARKER = ".cqkd-outputs.json"  # the files a report or the demo wrote into a directory of runs


def claim_outputs(directory: str | os.PathLike, names: tuple[str, ...], standard: bool = False) -> None:
    """Before writing ``names`` (paths relative to ``directory``: a report, the demo's summary),
    refuse (one line) any that exists and that cqkd did not write, and a symbolic link among their
    directories; then record them in ``directory/.cqkd-outputs.json``. ``standard``: the directory is
    cqkd's own (a sweep holding its sweep.json), whose files of these names cqkd wrote before the
    record existed."""
    directory = Path(directory)
    marker = directory / OUTPUTS_MARKER
    owned: set[str] = set(names) if standard else set()
    if marker.exists():
        files = read_json(marker).get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and _is_inside(f) for f in files):
            raise CqkdError(f"{marker} is not a cqkd marker (files must be a list of relative paths)")
        owned |= set(files)
    for name in names:
        for parent in Path(name).parents:
            if str(parent) != "." and (directory / parent).is_symlink():
                raise CqkdError(f"{directory / parent} is a symbolic link; cqkd writes only inside {directory} "
                                "(replace it with a directory)")
        if name not in owned and os.path.lexists(directory / name):
            raise CqkdError(f"{directory / name} was not written by cqkd; refusing to overwrite it "
                            "(move it away, or choose another directory)")
    recorded = set(read_json(marker).get("files", [])) if marker.exists() else set()
    if not set(names) <= recorded:
        write_json(marker, {"cqkd_outputs": 1, "cqkd_version": __version__, "files": sorted(recorded | set(names))})


def _is_inside(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _unlink_inside(root: Path, name: str) -> None:
    """Unlink ``root/name`` walking down with O_NOFOLLOW: a symbolic link on the way ends the walk,
    and a link at the end is removed itself, never its target. Directories are left alone."""
    parts = Path(name).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:  # missing, not a directory, or a symbolic link: nothing of ours below
                return
            os.close(fd)
            fd = sub
        try:
            os.unlink(parts[-1], dir_fd=fd)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists (even if owned by another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_state(run: RunDir) -> tuple[str | None, str]:
    """(state, note). A "running" run whose process is gone is reported as failed ("stale"): its
    lock is free, or (runs without a lock file) its pid is gone on this host. A run on another
    host without a lock that can be checked stays "running"."""
    if not run.status_file.exists():
        return None, "no status.json"
    try:
        status = run.status()
    except CqkdError as e:
        return "failed", f"unreadable status.json: {e}"
    state = status["state"]
    if state == "running":
        pid, host = status.get("pid"), status.get("host")
        same_host = host is None or host == socket.gethostname()
        who = f"pid {pid}" + (f" on {host}" if host else "") if pid else ""
        if run.lock_file.exists() and not holds(run.lock_file) and is_held(run.lock_file):
            return "running", who
        if isinstance(pid, int) and same_host and (pid == os.getpid() or run.lock_file.exists() or not pid_alive(pid)):
            return "failed", f"stale: process {pid} is gone" if pid != os.getpid() else "stale: left running by this process"
        return "running", who
    if state == "failed":
        return "failed", str(status.get("error", ""))
    return state, ""
