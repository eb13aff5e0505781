"""A sweep worker: claim the next runnable grid point, run it, record it; until nothing is left."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError, RunFailed, RunInterrupted
from cqkd.sweep.claims import Heartbeat, HeldFile, age, identity, take
from cqkd.sweep.plan import PlannedRun, SweepPlan, config_digest, weights_digest
from cqkd.sweep.progress import SweepProgress, estimate_left, fmt_duration, summary
from cqkd.sweep.state import (
    OPEN,
    SweepDir,
    assess,
    foreign_error,
    foreign_runs,
    join,
    now,
    touch,
)
from cqkd.train.checkpoints import resume_checkpoint
from cqkd.train.fit import fit_run
from cqkd.train.trackers import (
    Tracking,
    check_trackers,
    init_mlflow_store,
    tracker_names,
)

STALE_AFTER = 60.0  # seconds without a heartbeat after which a claim is taken over
EXIT_CLAIM_LOST = 75


@dataclass
class SweepResult:
    """What a worker saw: the runs it ran, those done before the sweep started, every failed run."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No run failed."""
        return not self.failed


def run_sweep(plan: SweepPlan, force: bool = False, dry_run: bool = False, progress: bool = True,
              print_fn: Callable[[str], None] | None = None, fit: Callable[..., dict[str, Any]] | None = None,
              stale_after: float = STALE_AFTER, threads: int | None = None) -> SweepResult:
    """Work on ``plan`` in this process, alone or next to other workers on the same directory.

    ``dry_run`` lists each run as done / run / rerun (failed before) and runs nothing; ``fit``
    defaults to ``fit_run`` (without Lightning's banners: the sweep has its own display); ``threads`` sets torch's CPU threads for the duration."""
    display = SweepProgress(plan, bar=progress)
    say = print_fn or display.say
    if dry_run:
        return _dry_run(plan, force, say)
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        with display:
            result = Worker(plan, force, stale_after, fit or functools.partial(fit_run, quiet=True), display, say).run()
    finally:
        torch.set_num_threads(before)
    for line in summary(plan, SweepDir(plan.out).load(), result.wall_s, len(result.ran), len(result.skipped)):
        say(line)
    return result


def _dry_run(plan: SweepPlan, force: bool, say: Callable[[str], None]) -> SweepResult:
    state = SweepDir(plan.out).load()
    todo, done = assess(plan, state, force)
    todo_names = {r.name for r in todo}
    foreign = foreign_runs(todo, state)
    for r in plan.runs:
        entry = state["runs"].get(r.name, {})
        failed_before = entry.get("state") == "failed"
        tag = "uses" if r.external else "done" if r.name not in todo_names else "foreign" if r in foreign \
            else "rerun" if failed_before else "run "
        error = entry.get("error") if tag == "rerun" else None
        say(f"[{tag}] {r.name}" + (f"  ({r.path})" if r.external else "")
            + (f"  (failed before: {error})" if error else "")
            + ("  (a run this sweep did not make: the sweep refuses to replace it)" if tag == "foreign" else ""))
    guess = estimate_left(plan, {"runs": {**{r.name: {"state": "pending"} for r in todo},
                                          **{r.name: {"state": "finished", "time_s": _time_s(r)} for r in done}}})
    say(f"{len(plan.runs)} runs: {len(done)} done, {len(todo)} to run"
        + (f", about {fmt_duration(guess)} at the speed of the finished ones" if guess is not None else ""))
    if foreign:
        raise foreign_error(foreign)
    return SweepResult(skipped=[r.name for r in done])


def _time_s(run: PlannedRun) -> float | None:
    rd = RunDir(run.path)
    if run.cfg is None or not rd.metrics_file.exists():
        return None
    try:
        return rd.metrics().get("time_s")
    except CqkdError:
        return None


@dataclass
class Job:
    """A claimed run: the claim, the stale claim it replaced, and whether it continues this sweep's attempt."""

    run: PlannedRun
    claim: HeldFile
    previous: dict[str, Any] | None
    continuing: bool


class Worker:
    """One worker of a sweep: joins the directory's session, then claims, runs and records runs."""

    def __init__(self, plan: SweepPlan, force: bool, stale_after: float, fit: Callable[..., dict[str, Any]],
                 display: SweepProgress | None = None, say: Callable[[str], None] = print, poll_s: float = 1.0) -> None:
        if not stale_after > 0:
            raise CqkdError(f"--stale-after must be > 0 seconds, got {stale_after}")
        self.plan, self.force, self.stale_after, self.fit = plan, force, stale_after, fit
        self.display, self.say, self.poll_s = display, say, poll_s
        self.sd = SweepDir(plan.out)
        self.me = identity()
        self.ran: list[str] = []
        self.index = self.slot = -1
        self.me_file: HeldFile | None = None

    def run(self) -> SweepResult:
        """Work until no run is left to do; the runs this worker ran and the sweep's failures."""
        start = time.time()
        with Heartbeat(min(5.0, self.stale_after / 4), _on_lost) as self.beat:
            self._join()
            try:
                while (job := self._next()) is not False:
                    if job is None:
                        time.sleep(self.poll_s)
                    else:
                        self._execute(job)
            finally:
                self._leave()
        state = self.sd.load()
        runs = state["runs"]
        return SweepResult(
            ran=list(self.ran), wall_s=time.time() - start,
            skipped=[r.name for r in self.plan.runs if runs[r.name]["state"] in ("finished", "external")
                     and runs[r.name].get("invocation") != self.index],
            failed={r.name: runs[r.name].get("error") or "" for r in self.plan.runs
                    if runs[r.name]["state"] == "failed"})

    def _join(self) -> None:
        with self.sd.locked() as state:
            self.index = join(state, self.sd, self.plan, self.force, self.stale_after)
            workers = state["invocations"][self.index]["workers"]
            self.slot = len(workers)
            workers.append({"host": self.me["host"], "pid": self.me["pid"], "start": now(), "end": None,
                            "ran": 0, "failed": 0})
            self.me_file = HeldFile.create(self.sd.worker_file(self.me), **self.me, invocation=self.index, run=None)
            touch(state, self.index)
        self.beat.hold(self.me_file)
        left = sum(state["runs"][r.name]["state"] in OPEN for r in self.plan.runs)
        self.say(f"sweep {self.plan.source}: {len(self.plan.runs)} runs, {len(self.plan.runs) - left} already done, "
                 f"{left} to run; out: {self.plan.out}")
        self._show(state)

    def _leave(self) -> None:
        with self.sd.locked() as state:
            state["invocations"][self.index]["workers"][self.slot]["end"] = now()
            touch(state, self.index)
        if self.me_file is not None:
            self.beat.drop(self.me_file)
            self.me_file.release()

    def _next(self) -> Job | None | bool:
        """Claim the first runnable run in plan order: a Job; None to wait (for a teacher, or for runs
        others hold); False when no run is left to do."""
        job, waiting = None, False
        with self.sd.locked() as state:
            for r in self.plan.runs:
                ready = self._ready(state, r)
                if ready is None:
                    continue
                claim, previous = take(self.sd.claim_file(r.name), self.stale_after, **self.me, claim=r.name) \
                    if ready else (None, None)
                if claim is None:
                    waiting = True
                    continue
                job = Job(r, claim, previous, continuing=state["runs"][r.name]["state"] in ("running", "interrupted"))
                self._start(state, job)
                break
        self._show(state)
        if job is not None:
            self.beat.hold(job.claim)
            return job
        return None if waiting else False

    def _ready(self, state: dict[str, Any], run: PlannedRun) -> bool | None:
        """Whether ``run`` may start now; None when it needs nothing more (it is done, or it has just been
        marked failed because its teacher failed)."""
        runs = state["runs"]
        entry = runs[run.name]
        if entry["state"] not in OPEN:
            return None
        if entry["state"] == "running" and self.sd.holder(run.name, self.stale_after) is not None:
            return False
        teacher = runs[f"teachers/{run.teacher}"] if run.teacher is not None else {"state": "external"}
        if teacher["state"] == "failed":
            self._skip(state, run, teacher.get("error"))
            return None
        return teacher["state"] in ("finished", "external")

    def _start(self, state: dict[str, Any], job: Job) -> None:
        entry = state["runs"][job.run.name]
        entry.update(state="running", started=now(), error=None, digest=job.run.cfg.digest(),
                     worker=f"{self.me['host']}:{self.me['pid']}", invocation=self.index,
                     attempts=entry.get("attempts", 0) + 1)
        if job.previous is not None:
            entry.setdefault("takeovers", []).append(
                {"from": f"{job.previous.get('host')}:{job.previous.get('pid')}", "at": now(),
                 "heartbeat_age_s": round(age(job.previous), 1)})
        touch(state, self.index)
        if self.me_file is not None:
            self.me_file.refresh(run=job.run.name)

    def _skip(self, state: dict[str, Any], run: PlannedRun, teacher_error: str | None) -> None:
        reason = f"skipped: teacher {run.teacher!r} failed ({teacher_error})"
        state["runs"][run.name].update(state="failed", error=reason, finished=now())
        self._count(state, "failed")
        touch(state, self.index)

    def _count(self, state: dict[str, Any], key: str) -> None:
        inv = state["invocations"][self.index]
        inv[key] += 1
        inv["workers"][self.slot][key] += 1

    def _execute(self, job: Job) -> None:
        run, rd = job.run, RunDir(job.run.path)
        if job.previous is not None and rd.state == "running":
            rd.set_state("failed", error=f"its worker {job.previous.get('host')}:{job.previous.get('pid')} "
                                         f"stopped; taken over by {self.me['host']}:{self.me['pid']}")
        if job.continuing and rd.is_finished and _stored_digest(rd) == config_digest(run.cfg):
            metrics = rd.metrics()  # it finished before its worker could record it
            self._record(job, "finished", time_s=metrics.get("time_s"), top1=metrics.get("top1"))
            self.ran.append(run.name)
            return
        how = how_to_start(rd, run.cfg, self.force and not job.continuing)
        if how.get("note"):
            self.say(f"{run.name}: {how.pop('note')}")
        if tracker_names(run.cfg):
            how["tracking"] = sweep_tracking(self.plan, run)
        t0 = time.time()
        try:
            metrics = self.fit(run.cfg, run.path, progress=self.display is not None and self.display.enabled, **how)
        except (KeyboardInterrupt, SystemExit, RunInterrupted):  # Lightning turns Ctrl-C into sys.exit(1)
            self._record(job, "interrupted", error="interrupted")
            raise
        except Exception as e:  # a failed run is recorded; the sweep goes on
            reason = str(e) if isinstance(e, (CqkdError, RunFailed)) else f"{type(e).__name__}: {e}"
            reason = reason.splitlines()[0] if reason else type(e).__name__
            self._record(job, "failed", error=reason, time_s=round(time.time() - t0, 1))
        else:
            self._record(job, "finished", time_s=metrics.get("time_s", round(time.time() - t0, 1)),
                         top1=metrics.get("top1"))
            self.ran.append(run.name)

    def _record(self, job: Job, outcome: str, **facts: Any) -> None:
        with self.sd.locked() as state:
            entry = state["runs"][job.run.name]
            entry.update(state=outcome, finished=now(), **facts)
            if outcome == "finished" and job.run.teacher is not None:
                entry["teacher_weights"] = weights_digest(self.plan.teacher_dirs[job.run.teacher])
            if outcome in ("finished", "failed"):
                self._count(state, "ran" if outcome == "finished" else "failed")
            touch(state, self.index)
        self.beat.drop(job.claim)
        job.claim.release()
        if self.me_file is not None:
            self.me_file.refresh(run=None)
        self._show(state)

    def _show(self, state: dict[str, Any]) -> None:
        if self.display is not None:
            self.display.update(state)


def _on_lost(held: HeldFile) -> None:
    """A claim moved away by another worker (this one's heartbeat was too old): stop at once, so that
    only one process writes the run. A lost worker file needs nothing."""
    if held.info.get("claim"):
        print(f"cqkd: another worker took over {held.info['claim']} (this worker's heartbeat was too old); "
              "stopping so that one process writes the run", file=sys.stderr, flush=True)
        os._exit(EXIT_CLAIM_LOST)


def sweep_tracking(plan: SweepPlan, run: PlannedRun) -> Tracking:
    """A sweep run's place in the trackers: the sweep's MLflow store and experiment (its directory's
    name), tagged with the sweep, the group, each key of its grid point (read from its name), its
    model and size."""
    sweep = os.path.basename(os.path.abspath(plan.out))
    point = run.name.partition("/")[2]
    tags = {"run": run.name, "sweep": sweep, "group": run.group}
    for part in point.split(","):
        key, eq, value = part.partition("=")
        if eq and key not in tags:
            tags[key] = value
    if run.group == "teachers":  # "teachers/NAME": a teacher's grid point is its name
        tags["teacher"] = point
    if run.cfg is not None:
        tags.setdefault("model", run.cfg.model)
        tags.setdefault("size", str(run.cfg.degradation_spec().size))
    return Tracking(store_dir=plan.out, experiment=sweep, tags=tags)


def prepare_trackers(plan: SweepPlan) -> None:
    """Before a sweep starts: its runs' trackers installed (one line naming the extra if not) and its
    local MLflow store created once."""
    cfgs = [r.cfg for r in plan.runs if r.cfg is not None]
    for cfg in cfgs:
        check_trackers(cfg)
    if any("mlflow" in tracker_names(c) and c.tracking_uri is None for c in cfgs):
        init_mlflow_store(plan.out, os.path.basename(os.path.abspath(plan.out)))


def how_to_start(rd: RunDir, cfg: RunConfig, force: bool) -> dict[str, Any]:
    """fit_run's arguments for a run to (re)do: continue an interrupted run of the same config
    from its checkpoint; start over (force) a finished, changed or unresumable one."""
    if not rd.config_file.exists():
        return {}
    if force or rd.is_finished or _stored_digest(rd) != config_digest(cfg):
        return {"force": True}
    try:
        ckpt = resume_checkpoint(rd, cfg)
    except CqkdError as e:
        return {"force": True, "note": f"cannot resume ({e}); starting it over"}
    if ckpt is None:
        return {"force": True}
    return {"resume": True, "note": f"resuming from {ckpt.name}"}


def _stored_digest(rd: RunDir) -> str | None:
    try:
        return config_digest(rd.config())
    except CqkdError:
        return None
