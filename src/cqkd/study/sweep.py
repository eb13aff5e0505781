"""Resumable sweeps: a YAML grid of teacher, supervised and CQKD runs, one run directory each.

The sweep file (see ``configs/fashion-mnist-study.yaml``)::

    base:                 # RunConfig keys shared by every run
      dataset: fashion-mnist
      epochs: 10
    teachers:             # named teacher runs: RunConfig keys (trained here) or {path: RUN_DIR}
      large: {model: cnn-large, size: 28}
    supervised:           # a grid (or a list of grids); any value may be a list
      model: cnn-small
      size: [14, 7]
      seed: [0, 1, 2]
    distill:              # a grid (or a list of grids); `teacher` names a teacher above
      - teacher: large
        size: [14, 7]
        temperature: [1, 4, calibrated]
        teacher_calibration: none
        seed: [0, 1, 2]
    budget_minutes: 120   # optional: the wall-time budget, quoted in the report

Layout of the output directory::

    sweep.json            the plan, the state of every run, failures and timing
    teachers/NAME/        a teacher run (unless given by path)
    supervised/KEY=VALUE,.../
    distill/teacher=NAME,model=...,size=7,T=4,tcal=none,alpha=0.5,seed=0,.../

A run is skipped when its directory holds a finished run whose stored config has the same
``RunConfig.digest()`` (teacher paths compared as absolute paths) and whose teacher's weights
are those it was distilled from; everything else runs. Seeds are the outer loop, so an
interrupted sweep has a complete picture at seed 0 first (over all grids of a section). A failed run is recorded in
``sweep.json`` and the sweep goes on; the students of a failed teacher are recorded as failed
without running.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cqkd.core.config import CONFIG_KEYS, RunConfig
from cqkd.core.io import read_json, read_yaml, write_json
from cqkd.core.lock import Lock, acquire
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError, RunFailed, RunInterrupted, check_keys
from cqkd.nets.teacher import file_digest
from cqkd.train.checkpoints import resume_checkpoint
from cqkd.train.fit import fit_run

SWEEP_FILE = "sweep.json"


TOP_LEVEL = ("base", "teachers", "supervised", "distill", "budget_minutes", "description")


GROUPS = ("teachers", "supervised", "distill")




# keys that always appear in a run's directory name, in this order, with these short names
_NAME_KEYS = {
    "supervised": (("model", "model"), ("size", "size")),
    "distill": (("teacher", "teacher"), ("model", "model"), ("size", "size"), ("temperature", "T"),
                ("teacher_calibration", "tcal"), ("alpha", "alpha")),
}


_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass
class PlannedRun:
    """One grid point: its directory (relative to the sweep), role and resolved config."""

    name: str  # e.g. "distill/teacher=large,model=cnn-small,size=7,T=4,tcal=none,alpha=0.5,seed=0"
    group: str  # "teachers", "supervised" or "distill"
    cfg: RunConfig | None  # None for a teacher given by path
    teacher: str | None = None  # the teacher's name, for students
    path: Path | None = None  # the run directory (for external teachers: where it is)

    @property
    def external(self) -> bool:
        return self.cfg is None


@dataclass
class SweepPlan:
    out: Path
    runs: list[PlannedRun]
    source: str = ""
    budget_minutes: float | None = None
    description: str = ""
    teacher_dirs: dict[str, Path] = field(default_factory=dict)

    def by_name(self) -> dict[str, PlannedRun]:
        return {r.name: r for r in self.runs}


def load_sweep(path: str | os.PathLike, out: str | os.PathLike) -> SweepPlan:
    """Read a sweep YAML file and expand it into the runs it asks for (validating everything)."""
    raw = read_yaml(path, shape=None, name=f"sweep file {str(path)!r}")
    return plan_sweep(raw, out, where=str(path))


def _check_keys(section: dict[str, Any], where: str, allowed: Iterable[str] = CONFIG_KEYS,
                forbidden: Iterable[str] = ("kind",)) -> None:
    check_keys(section, allowed, where)
    for key in section:
        if key in forbidden:
            raise CqkdError(f"{where}: key {key!r} is set by the sweep and may not be given here")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CqkdError(f"{where} must be a mapping of keys to values, not {type(value).__name__}")
    return value


def _grids(value: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """A section holding one grid (a mapping) or several (a list of mappings)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(where, value)]
    if isinstance(value, list) and value:
        return [(f"{where}[{i}]", _mapping(g, f"{where}[{i}]")) for i, g in enumerate(value)]
    raise CqkdError(f"{where} must be a mapping (one grid) or a non-empty list of mappings")


def _expand(grid: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """All combinations of the list-valued keys; ``seed`` varies slowest, then the YAML order."""
    axes: list[tuple[str, list[Any]]] = []
    for key, value in grid.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise CqkdError(f"{where}: {key} is an empty list")
        for v in values:
            if isinstance(v, (list, dict)):
                raise CqkdError(f"{where}: {key}: a grid value must be a scalar, not {v!r}")
        if len(set(map(repr, values))) != len(values):
            raise CqkdError(f"{where}: {key} lists a value twice: {values!r}")
        axes.append((key, values))
    axes.sort(key=lambda kv: kv[0] != "seed")  # stable: seed first, the rest in YAML order
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:g}"
    elif v is None:
        text = "none"
    else:
        text = str(v)
    return _SAFE.sub("_", text) or "_"


def run_name(group: str, point: dict[str, Any], cfg: RunConfig, extra_keys: Iterable[str]) -> str:
    """The directory name of a grid point: the fixed identity keys, the grid's other keys, seed."""
    parts = []
    shown = set()
    for key, short in _NAME_KEYS[group]:
        value = point["teacher"] if key == "teacher" else getattr(cfg, key)
        parts.append(f"{short}={_fmt_value(value)}")
        shown.add(key)
    for key in sorted(set(extra_keys) - shown - {"seed"}):
        parts.append(f"{key}={_fmt_value(getattr(cfg, key))}")
    parts.append(f"seed={cfg.seed}")
    name = ",".join(parts)
    if len(name) > 200:  # keep below common file-name limits, still unique and stable
        import hashlib

        name = name[:180] + ",h=" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{group}/{name}"


def plan_sweep(raw: Any, out: str | os.PathLike, where: str = "sweep") -> SweepPlan:
    """Expand a parsed sweep file into planned runs (teachers first), validating every config."""
    out = Path(os.path.normpath(out))
    raw = _mapping(raw, where)
    _check_keys(raw, where, TOP_LEVEL, forbidden=())
    base = _mapping(raw.get("base"), f"{where}: base")
    _check_keys(base, f"{where}: base", forbidden=("kind", "teacher"))
    for key, value in base.items():
        if isinstance(value, list):
            raise CqkdError(f"{where}: base: {key} must be a single value (put lists in supervised/distill)")
    budget = raw.get("budget_minutes")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise CqkdError(f"{where}: budget_minutes={budget!r} must be a number > 0")

    runs: list[PlannedRun] = []
    teacher_dirs: dict[str, Path] = {}
    teachers = _mapping(raw.get("teachers"), f"{where}: teachers")
    for tname, entry in teachers.items():
        tw = f"{where}: teachers.{tname}"
        if not isinstance(tname, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tname):
            raise CqkdError(f"{tw}: a teacher name may hold letters, digits, '.', '_' and '-' only")
        entry = _mapping(entry, tw)
        if "path" in entry:
            if len(entry) > 1:
                raise CqkdError(f"{tw}: 'path' reuses an existing run and takes no other keys "
                                f"(got {', '.join(k for k in entry if k != 'path')})")
            tpath = Path(os.path.normpath(str(entry["path"])))
            trun = RunDir(tpath)
            if not trun.is_finished:
                raise CqkdError(f"{tw}: path={str(entry['path'])!r} is not a finished cqkd run")
            trun.config()  # must be readable
            teacher_dirs[tname] = tpath
            runs.append(PlannedRun(f"teachers/{tname}", "teachers", None, path=tpath))
            continue
        _check_keys(entry, tw, forbidden=("kind", "teacher"))
        for key, value in entry.items():
            if isinstance(value, list):
                raise CqkdError(f"{tw}: {key} must be a single value (define several named teachers instead)")
        cfg = RunConfig.from_dict({**base, **entry, "kind": "train"}, where=tw)
        teacher_dirs[tname] = out / "teachers" / tname
        runs.append(PlannedRun(f"teachers/{tname}", "teachers", cfg, path=out / "teachers" / tname))

    for gw, grid in _grids(raw.get("supervised"), f"{where}: supervised"):
        _check_keys(grid, gw, forbidden=("kind", "teacher", "temperature", "alpha", "teacher_calibration",
                                         "teacher_cache"))
        for point in _expand(grid, gw):
            cfg = RunConfig.from_dict({**base, **point, "kind": "train"}, where=f"{gw} {_point_text(point)}")
            name = run_name("supervised", point, cfg, grid)
            runs.append(PlannedRun(name, "supervised", cfg, path=out / name))

    for gw, grid in _grids(raw.get("distill"), f"{where}: distill"):
        _check_keys(grid, gw, forbidden=("kind",))
        grid = dict(grid)
        if "teacher" not in grid:
            if len(teacher_dirs) != 1:
                raise CqkdError(f"{gw}: teacher: name one of the teachers ({', '.join(teacher_dirs) or 'none defined'})")
            grid["teacher"] = next(iter(teacher_dirs))
        for point in _expand(grid, gw):
            tname = point["teacher"]
            if tname not in teacher_dirs:
                raise CqkdError(f"{gw}: teacher={tname!r} is not one of the teachers "
                                f"({', '.join(teacher_dirs) or 'none defined'})")
            values = {**base, **point, "kind": "distill", "teacher": str(teacher_dirs[tname])}
            cfg = RunConfig.from_dict(values, where=f"{gw} {_point_text(point)}")
            name = run_name("distill", point, cfg, grid)
            runs.append(PlannedRun(name, "distill", cfg, teacher=tname, path=out / name))

    # teachers, then supervised, then distill; within each, seed 0 of every grid first
    order = {g: i for i, g in enumerate(GROUPS)}
    runs.sort(key=lambda r: (order[r.group], r.cfg.seed if r.cfg is not None else 0))
    seen: dict[str, PlannedRun] = {}
    for r in runs:
        if r.name in seen:
            if r.cfg is not None and seen[r.name].cfg is not None and r.cfg.digest() == seen[r.name].cfg.digest():
                raise CqkdError(f"{where}: the run {r.name!r} appears twice in the grids")
            raise CqkdError(f"{where}: two different grid points share the directory {r.name!r}; "
                            "give the key that tells them apart in both grids")
        seen[r.name] = r
    if not runs:
        raise CqkdError(f"{where}: nothing to run (give teachers, supervised or distill)")
    return SweepPlan(out, runs, source=where, budget_minutes=budget, description=str(raw.get("description") or ""),
                     teacher_dirs=teacher_dirs)


def _point_text(point: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"


def _abs_teacher(cfg: RunConfig) -> RunConfig:
    if cfg.teacher:
        return RunConfig.from_dict({**cfg.to_dict(), "teacher": os.path.abspath(cfg.teacher)})
    return cfg


def config_digest(cfg: RunConfig) -> str:
    """``RunConfig.digest()`` with the teacher path made absolute (so './out' and 'out' agree)."""
    return _abs_teacher(cfg).digest()


def weights_digest(run_dir: Path) -> str | None:

    w = RunDir(run_dir).weights_file
    return file_digest(w) if w.exists() else None


def load_state(out: Path) -> dict[str, Any]:
    """The sweep state in ``out/sweep.json`` (empty when there is none), checked for its shape."""
    f = out / SWEEP_FILE
    if not f.exists():
        return {"runs": {}, "invocations": []}
    state = read_json(f)
    state.setdefault("runs", {})
    state.setdefault("invocations", [])
    state.setdefault("plan", [])
    runs, plan, calls = state["runs"], state["plan"], state["invocations"]
    good = (isinstance(runs, dict) and all(isinstance(v, dict) and isinstance(v.get("config") or {}, dict)
                                            and isinstance(v.get("state") or "", str) for v in runs.values())
            and isinstance(plan, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                               and isinstance(i.get("group"), str)
                                               and isinstance(i.get("path") or "", str) for i in plan)
            and isinstance(calls, list) and all(isinstance(i, dict) and isinstance(i.get("wall_s") or 0, (int, float))
                                                for i in calls))
    if not good:
        raise CqkdError(f"{f} is not a cqkd sweep state (its runs, plan or invocations have the wrong shape); "
                        "move it away to start the sweep's bookkeeping over")
    return state


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
    if run.teacher is not None:
        recorded = state["runs"].get(run.name, {}).get("teacher_weights")
        if recorded is not None and recorded != teacher_weights.get(run.teacher):
            return False
    return True


@dataclass
class SweepResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fmt_duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class _Estimator:
    """Remaining time: the mean duration of finished runs of the same kind and input size."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, int], list[float]] = {}

    @staticmethod
    def key(run: PlannedRun) -> tuple[str, int]:
        return (run.group, run.cfg.size if run.cfg else 0)

    def add(self, run: PlannedRun, seconds: float | None) -> None:
        if seconds is not None and run.cfg is not None:
            self.times.setdefault(self.key(run), []).append(float(seconds))

    def estimate(self, runs: list[PlannedRun]) -> float | None:
        every = [t for ts in self.times.values() for t in ts]
        if not every:
            return None
        total = 0.0
        for r in runs:
            ts = self.times.get(self.key(r)) or [t for (g, _), v in self.times.items() if g == r.group for t in v] or every
            total += sum(ts) / len(ts)
        return total


def run_sweep(plan: SweepPlan, force: bool = False, dry_run: bool = False, progress: bool = True,
              print_fn: Callable[[str], None] | None = None,
              fit: Callable[..., dict[str, Any]] | None = None) -> SweepResult:
    """Run every unfinished run of ``plan`` (teachers first), recording states in sweep.json.

    ``dry_run`` lists each run as done / run / rerun (failed before) and runs nothing.
    ``fit`` defaults to ``cqkd.training.fit_run``.
    """
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False, soft_wrap=True)
    say = print_fn or (lambda text: console.print(escape(text)))
    if dry_run:
        state, todo, done, est = _assess(plan, force)
        guess = est.estimate(todo)
        todo_names = {r.name for r in todo}
        for r in plan.runs:
            failed_before = state["runs"].get(r.name, {}).get("state") == "failed"
            tag = "done" if r.name not in todo_names else ("rerun" if failed_before else "run ")
            if r.external:
                tag = "uses"
            error = state["runs"].get(r.name, {}).get("error") if tag == "rerun" else None
            say(f"[{tag}] {r.name}" + (f"  ({r.path})" if r.external else "")
                + (f"  (failed before: {error})" if error else ""))
        say(f"{len(plan.runs)} runs: {len(done)} done, {len(todo)} to run"
            + (f", about {_fmt_duration(guess)} at the speed of the finished ones" if guess is not None else ""))
        return SweepResult(skipped=[r.name for r in done])

    fit = fit or fit_run
    plan.out.mkdir(parents=True, exist_ok=True)
    with _lock(plan.out):
        state, todo, done, est = _assess(plan, force)
        return _run_locked(plan, state, todo, done, est, force, progress, say, console, fit)


def _assess(plan: SweepPlan, force: bool) -> tuple[dict[str, Any], list[PlannedRun], list[PlannedRun], "_Estimator"]:
    """The sweep state, the runs to do and the runs done (teachers first), and a time estimator."""
    state = load_state(plan.out)
    teacher_weights = {name: weights_digest(path) for name, path in plan.teacher_dirs.items()}
    todo_names = {r.name for r in plan.runs
                  if (force and not r.external) or not is_done(r, state, teacher_weights)}
    # a teacher that will be (re)trained invalidates its students
    retrain = {r.name.split("/", 1)[1] for r in plan.runs if r.group == "teachers" and r.name in todo_names}
    todo_names |= {r.name for r in plan.runs if r.teacher in retrain}
    todo = [r for r in plan.runs if r.name in todo_names]
    done = [r for r in plan.runs if r.name not in todo_names]
    est = _Estimator()
    for r in done:
        if r.cfg is not None and RunDir(r.path).metrics_file.exists():
            try:
                est.add(r, RunDir(r.path).metrics().get("time_s"))
            except CqkdError:
                pass
    return state, todo, done, est


def _lock(out: Path) -> Lock:
    """One sweep at a time per output directory (``.sweep.lock``, see ``cqkd.core.lock``)."""
    return acquire(out / ".sweep.lock", f"the sweep directory {str(out)!r}")


def _run_locked(plan: SweepPlan, state: dict[str, Any], todo: list[PlannedRun], done: list[PlannedRun],
                est: _Estimator, force: bool, progress: bool, say: Callable[[str], None], console: Any,
                fit: Callable[..., dict[str, Any]]) -> SweepResult:
    from rich.markup import escape

    out = plan.out
    teacher_weights = {name: weights_digest(path) for name, path in plan.teacher_dirs.items()}
    todo_names = {r.name for r in todo}
    start = time.time()
    invocation = {"start": _now(), "end": None, "wall_s": None, "ran": 0, "failed": 0, "skipped": len(done),
                  "pid": os.getpid(), "force": force}
    state["invocations"].append(invocation)
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
            if r.cfg is not None:
                entry.setdefault("digest", r.cfg.digest())
        else:
            entry["state"] = "pending"

    def save() -> None:
        state["total_wall_s"] = round(sum(i["wall_s"] or 0 for i in state["invocations"][:-1])
                                      + time.time() - start, 1)
        invocation.update(end=_now(), wall_s=round(time.time() - start, 1))
        write_json(out / SWEEP_FILE, state)

    save()
    result = SweepResult(skipped=[r.name for r in done])
    failed_teachers: dict[str, str] = {}
    say(f"sweep {plan.source}: {len(plan.runs)} runs, {len(done)} already done, {len(todo)} to run; out: {out}")

    display = _Display(console, len(plan.runs), len(done), enabled=progress and console.is_terminal)
    try:
        with display:
            for i, run in enumerate(todo):
                remaining = todo[i:]
                display.update(run.name, est.estimate(remaining), plan.budget_minutes, state)
                entry = state["runs"][run.name]
                if run.teacher in failed_teachers:
                    reason = f"skipped: teacher {run.teacher!r} failed ({failed_teachers[run.teacher]})"
                    entry.update(state="failed", error=reason, finished=_now())
                    result.failed[run.name] = reason
                    invocation["failed"] += 1
                    display.log(f"[red]skip[/red] {escape(run.name)}: teacher {run.teacher!r} failed")
                    display.advance()
                    save()
                    continue
                entry.update(state="running", started=_now(), error=None, digest=run.cfg.digest())
                save()
                t0 = time.time()
                how = _how_to_start(RunDir(run.path), run.cfg, force)
                if how.get("note"):
                    display.log(escape(f"{run.name}: {how.pop('note')}"))
                try:
                    metrics = fit(run.cfg, run.path, progress=False, **how)
                except (KeyboardInterrupt, SystemExit, RunInterrupted):  # Lightning turns Ctrl-C into sys.exit(1)
                    entry.update(state="failed", error="interrupted", finished=_now())
                    raise
                except Exception as e:  # a failed run is recorded; the sweep goes on
                    reason = str(e) if isinstance(e, (CqkdError, RunFailed)) else f"{type(e).__name__}: {e}"
                    reason = reason.splitlines()[0] if reason else type(e).__name__
                    entry.update(state="failed", error=reason, finished=_now(), time_s=round(time.time() - t0, 1))
                    result.failed[run.name] = reason
                    invocation["failed"] += 1
                    if run.group == "teachers":
                        failed_teachers[run.name.split("/", 1)[1]] = reason
                    display.log(f"[red]failed[/red] {escape(run.name)}: {escape(reason)}")
                else:
                    seconds = metrics.get("time_s", round(time.time() - t0, 1))
                    entry.update(state="finished", finished=_now(), time_s=seconds)
                    if run.teacher is not None:
                        entry["teacher_weights"] = teacher_weights.get(run.teacher)
                    if run.group == "teachers":
                        teacher_weights[run.name.split("/", 1)[1]] = weights_digest(run.path)
                    est.add(run, seconds)
                    result.ran.append(run.name)
                    invocation["ran"] += 1
                    display.log(f"[green]done[/green] {escape(run.name)}: top-1 {metrics.get('top1', float('nan')):.4f}, "
                                f"{_fmt_duration(seconds)}")
                display.advance()
                save()
    finally:
        result.wall_s = time.time() - start
        save()
    n_ok = len(plan.runs) - len(result.failed)
    say(f"sweep finished in {_fmt_duration(result.wall_s)}: {len(result.ran)} ran, {len(result.skipped)} were done, "
        f"{len(result.failed)} failed ({n_ok}/{len(plan.runs)} finished); state: {out / SWEEP_FILE}")
    for name, reason in result.failed.items():
        say(f"  failed: {name}: {reason}")
    return result


def _how_to_start(rd: RunDir, cfg: RunConfig, force: bool) -> dict[str, Any]:
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


class _Display:
    """A rich progress bar (runs done / total, time estimate); plain lines when disabled."""

    def __init__(self, console: Any, total: int, done: int, enabled: bool) -> None:
        self.console, self.enabled, self.total, self.done = console, enabled, total, done
        self.progress = None
        self.task = None

    def __enter__(self) -> "_Display":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            self.progress = Progress(TextColumn("[bold]sweep", table_column=Column(no_wrap=True, min_width=5)),
                                     BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[eta]}", table_column=Column(no_wrap=True)),
                                     TextColumn("{task.description}",
                                                table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                                     console=self.console, transient=False, expand=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=self.total, completed=self.done, eta="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, name: str, remaining_s: float | None, budget_minutes: float | None, state: dict) -> None:
        from rich.markup import escape

        eta = f"~{_fmt_duration(remaining_s)} left" if remaining_s is not None else "estimating"
        if remaining_s is not None and budget_minutes:
            used = state.get("total_wall_s") or 0.0
            if used + remaining_s > budget_minutes * 60:
                eta += f" [yellow](over the {budget_minutes:g} min budget)[/yellow]"
        if self.progress is not None:
            self.progress.update(self.task, description=escape(name), eta=eta)
        else:
            self.console.print(f"\\[{self.done + 1}/{self.total}] {escape(name)} ({eta})", highlight=False)

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.advance(self.task)

    def log(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)
