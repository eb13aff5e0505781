"""The sweep plan: a YAML grid of teacher, supervised and CQKD runs expanded into named runs.

The file format and the naming of run directories are described in docs/sweeps.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cqkd.core.config import CONFIG_KEYS, RunConfig
from cqkd.core.io import read_yaml
from cqkd.core.rundir import RunDir
from cqkd.distill.methods import check_method
from cqkd.errors import CqkdError, check_keys
from cqkd.nets.teacher import file_digest

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
        """A teacher given by path: used as it is, never run."""
        return self.cfg is None


@dataclass
class SweepPlan:
    """The runs of a sweep in the order they start, and the sweep file they came from."""

    out: Path
    runs: list[PlannedRun]
    source: str = ""
    budget_minutes: float | None = None
    description: str = ""
    teacher_dirs: dict[str, Path] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the parsed sweep file, to ship to remote workers

    def by_name(self) -> dict[str, PlannedRun]:
        """The planned runs by name."""
        return {r.name: r for r in self.runs}

    def digest(self) -> str:
        """A short hash of what the sweep runs: each run's name and resolved config (teacher paths absolute)."""
        items = [(r.name, os.path.abspath(r.path) if r.external else config_digest(r.cfg)) for r in self.runs]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


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
            # the path as --out spells it (sweeps in two directories with the same relative --out record the
            # same configs); a sweep matches its teachers by weights digest, not by this path (teacher_matches)
            values = {**base, **point, "kind": "distill", "teacher": str(teacher_dirs[tname])}
            cfg = RunConfig.from_dict(values, where=f"{gw} {_point_text(point)}")
            try:
                check_method(cfg.method)
            except CqkdError as e:
                raise CqkdError(f"{gw} {_point_text(point)}: {e}") from None
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
                     teacher_dirs=teacher_dirs, raw=raw)


def _point_text(point: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"


def config_digest(cfg: RunConfig) -> str:
    """``RunConfig.digest()`` without the teacher's path: a sweep matches a student's teacher by the
    digest of its weights (``teacher_matches``), so that a sweep re-planned from another working
    directory, or moved, still knows its finished runs."""
    if cfg.teacher:
        return RunConfig.from_dict({**cfg.to_dict(), "teacher": "<teacher>"}).digest()
    return cfg.digest()


def teacher_matches(stored: RunConfig, planned: RunConfig, recorded: str | None, current: str | None) -> bool:
    """Whether a finished student was distilled from the planned teacher: by the teacher weights'
    digest where one was recorded (the student's metrics.json or sweep.json), else by its path."""
    if recorded is not None:
        return recorded == current
    if not stored.teacher or not planned.teacher:
        return stored.teacher == planned.teacher
    return os.path.abspath(stored.teacher) == os.path.abspath(planned.teacher)


def weights_digest(run_dir: Path) -> str | None:
    """The digest of a run's trained weights (None before it has any)."""
    w = RunDir(run_dir).weights_file
    return file_digest(w) if w.exists() else None


