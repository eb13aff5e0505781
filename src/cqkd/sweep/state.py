"""The shared state of a sweep directory: sweep.json under a short file lock, sessions, claims and workers."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cqkd.core.io import check_creatable, read_json, refuse_symlink, write_json
from cqkd.core.lock import acquire
from cqkd.core.rundir import OUTPUTS_MARKER, RunDir
from cqkd.errors import CqkdError
from cqkd.sweep.claims import age, read_held
from cqkd.sweep.plan import (
    PlannedRun,
    SweepPlan,
    config_digest,
    teacher_matches,
    weights_digest,
)

SWEEP_FILE = "sweep.json"
DONE = ("finished", "failed", "external")  # states a run keeps until the next session
OPEN = ("pending", "running", "interrupted")  # states a worker still has to deal with


def now() -> str:
    """The local time as recorded in sweep.json."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SweepDir:
    """A sweep's output directory: sweep.json and the coordination files under ``.sweep/``."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)

    state_file = property(lambda self: self.out / SWEEP_FILE)
    meta = property(lambda self: self.out / ".sweep")
    lock_file = property(lambda self: self.meta / "lock")
    claims = property(lambda self: self.meta / "claims")
    workers = property(lambda self: self.meta / "workers")
    logs = property(lambda self: self.meta / "logs")

    def claim_file(self, name: str) -> Path:
        """Where the claim on run ``name`` ("group/dir") lives."""
        return self.claims / f"{name}.json"

    def worker_file(self, ident: dict[str, Any]) -> Path:
        """Where a worker announces itself."""
        return self.workers / f"{ident['host']}.{ident['pid']}.{ident['token']}.json"

    def load(self) -> dict[str, Any]:
        """sweep.json (an empty state if there is none yet)."""
        state = read_json(self.state_file) if self.state_file.exists() else {}
        if not isinstance(state, dict):
            raise CqkdError(f"{self.state_file} is not a cqkd sweep state (not a mapping); move it away to "
                            "start the sweep's bookkeeping over")
        state.setdefault("runs", {})
        state.setdefault("invocations", [])
        runs, plan, calls = state["runs"], state.get("plan", []), state["invocations"]
        good = (isinstance(runs, dict) and all(isinstance(v, dict) and isinstance(v.get("config") or {}, dict)
                                                and isinstance(v.get("state") or "", str) for v in runs.values())
                and isinstance(plan, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                   and isinstance(i.get("group"), str)
                                                   and isinstance(i.get("path") or "", str) for i in plan)
                and isinstance(calls, list) and all(isinstance(i, dict) for i in calls))
        if not good:
            raise CqkdError(f"{self.state_file} is not a cqkd sweep state (its runs, plan or invocations have the "
                            "wrong shape); move it away to start the sweep's bookkeeping over")
        return state

    @contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """Hold the sweep's lock and yield sweep.json; changes are written back when the block ends."""
        refuse_symlink(self.meta)  # its claims and logs are cleaned: never beyond a link
        self.meta.mkdir(parents=True, exist_ok=True)
        try:
            lock = acquire(self.lock_file, f"the sweep state of {str(self.out)!r}", wait=True)
        except OSError as e:
            raise CqkdError(f"cannot lock {self.lock_file} ({e.strerror}); a sweep directory shared by "
                            "several workers needs a file system with locks (NFS, Lustre, GPFS do)") from None
        with lock:
            state = self.load()
            before = copy.deepcopy(state)
            yield state
            if state != before:
                write_json(self.state_file, state)

    def live_workers(self, stale_after: float) -> list[dict[str, Any]]:
        """The workers whose heartbeat is younger than ``stale_after`` seconds."""
        found = []
        for f in sorted(self.workers.glob("*.json")) if self.workers.is_dir() else []:
            info = read_held(f)
            if info is not None and age(info) < stale_after:
                found.append(info)
        return found

    def holder(self, name: str, stale_after: float) -> dict[str, Any] | None:
        """The live claim on run ``name``, if any."""
        info = read_held(self.claim_file(name))
        return info if info is not None and age(info) < stale_after else None


def load_state(out: str | os.PathLike) -> dict[str, Any]:
    """A sweep directory's sweep.json, read without the lock (it is always replaced whole)."""
    return SweepDir(out).load()


def is_done(run: PlannedRun, state: dict[str, Any], teacher_weights: dict[str, str | None]) -> bool:
    """Finished, with the same resolved config, and (students) distilled from today's teacher."""
    if run.external:
        return True
    rd = RunDir(run.path)
    if not rd.is_finished:
        return False
    try:
        stored = rd.config()
    except CqkdError:
        return False
    if config_digest(stored) != config_digest(run.cfg):
        return False
    if run.cfg is not None and run.cfg.teacher:
        recorded = state["runs"].get(run.name, {}).get("teacher_weights") or _recorded_teacher(rd)
        current = teacher_weights.get(run.teacher) if run.teacher is not None else None
        if not teacher_matches(stored, run.cfg, recorded, current):
            return False
    return True


def _recorded_teacher(rd: RunDir) -> str | None:
    """The digest of the teacher's weights that a student recorded in its metrics.json (None before it did)."""
    try:
        digest = rd.metrics().get("teacher_digest")
    except CqkdError:
        return None
    return digest if isinstance(digest, str) and digest else None


def assess(plan: SweepPlan, state: dict[str, Any], force: bool) -> tuple[list[PlannedRun], list[PlannedRun]]:
    """The runs to do and the runs done; a teacher that will be (re)trained sends its students back to do."""
    teacher_weights = {name: weights_digest(path) for name, path in plan.teacher_dirs.items()}
    todo_names = {r.name for r in plan.runs
                  if (force and not r.external) or not is_done(r, state, teacher_weights)}
    retrain = {r.name.split("/", 1)[1] for r in plan.runs if r.group == "teachers" and r.name in todo_names}
    todo_names |= {r.name for r in plan.runs if r.teacher in retrain}
    return [r for r in plan.runs if r.name in todo_names], [r for r in plan.runs if r.name not in todo_names]


def join(state: dict[str, Any], sd: SweepDir, plan: SweepPlan, force: bool, stale_after: float) -> int:
    """Join the session that live workers run in this directory, or open a new one: the index of
    its entry in ``invocations``. A new session assesses what is done and marks the rest pending."""
    invocations = state["invocations"]
    alive = sd.live_workers(stale_after)
    live = [w for w in alive if w.get("invocation") == len(invocations) - 1]
    if live and invocations:
        current = invocations[-1]
        who = ", ".join(f"{w.get('host')}:{w.get('pid')}" for w in live)
        if current.get("plan_digest") != plan.digest():
            raise CqkdError(f"another sweep (workers {who}) is running in {str(sd.out)!r} with a different plan; "
                            "wait for it, or give this one another --out")
        if force and not current.get("force"):
            raise CqkdError(f"--force: the sweep in {str(sd.out)!r} is already running (workers {who}) without "
                            "--force; it applies when a sweep starts")
        return len(invocations) - 1
    for f in sd.workers.glob("*.json") if sd.workers.is_dir() else []:
        if not any(f == sd.worker_file(w) for w in alive):
            f.unlink(missing_ok=True)  # left by a killed worker
    return _open_session(state, plan, force)


def foreign_runs(todo: list[PlannedRun], state: dict[str, Any]) -> list[PlannedRun]:
    """The runs to do whose directory already holds a cqkd run that this sweep did not make (it
    never started it nor found it done there): a sweep replaces only its own runs."""
    found = []
    for r in todo:
        entry = state["runs"].get(r.name, {})
        if r.external or entry.get("started") or entry.get("digest"):
            continue
        rd = RunDir(r.path)
        if rd.path.is_dir() and (rd.is_run or rd.config_file.exists()):
            found.append(r)
    return found


def foreign_error(foreign: list[PlannedRun]) -> CqkdError:
    """The one line that refuses to replace runs a sweep did not make."""
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    return CqkdError(f"{foreign[0].path} holds a run that this sweep did not make{more}; a sweep replaces only "
                     "its own runs: move it away, or give the sweep another --out")


def _open_session(state: dict[str, Any], plan: SweepPlan, force: bool) -> int:
    todo, done = assess(plan, state, force)
    foreign = foreign_runs(todo, state)
    if foreign:
        raise foreign_error(foreign)
    todo_names = {r.name for r in todo}
    state.update(source=plan.source, description=plan.description, budget_minutes=plan.budget_minutes,
                 plan=[{"name": r.name, "group": r.group, "teacher": r.teacher,
                        "path": str(r.path) if r.external else None} for r in plan.runs])
    for r in plan.runs:
        entry = state["runs"].setdefault(r.name, {})
        entry.update(group=r.group, teacher=r.teacher, config=r.cfg.to_dict() if r.cfg is not None else None)
        if r.external:
            entry.update(state="external", path=str(r.path))
        elif r.name not in todo_names:
            entry["state"] = "finished"
            entry.setdefault("digest", r.cfg.digest())
        else:
            entry["state"] = "pending"
    start = time.time()
    state["invocations"].append({"start": now(), "start_s": start, "end": None, "wall_s": None, "ran": 0,
                                 "failed": 0, "skipped": len(done), "pid": os.getpid(), "force": force,
                                 "plan_digest": plan.digest(), "workers": []})
    return len(state["invocations"]) - 1


def touch(state: dict[str, Any], index: int) -> None:
    """Bring a session's end, wall time and the sweep's total wall time up to now."""
    inv = state["invocations"][index]
    inv.update(end=now(), wall_s=round(time.time() - inv["start_s"], 1))
    state["total_wall_s"] = round(sum(i.get("wall_s") or 0 for i in state["invocations"]), 1)


def check_sweep_dir(path: Path) -> None:
    """A sweep writes into a new or empty directory, or one holding its ``sweep.json``; never elsewhere."""
    if not path.exists():
        check_creatable(path, "--out", str(path))
        return
    if not path.is_dir():
        raise CqkdError(f"--out {str(path)!r} exists and is not a directory")
    others = sorted(p.name for p in path.iterdir() if p.name not in (".sweep", ".sweep.lock", OUTPUTS_MARKER))
    if others and not (path / "sweep.json").exists():
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise CqkdError(f"--out {str(path)!r} is not empty and is not a cqkd sweep (no sweep.json; it holds {shown}); "
                        "choose another directory")
