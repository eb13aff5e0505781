"""The progress of a sweep, read from its state: a rich progress bar in a terminal, else one line per run."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column

from cqkd.sweep.plan import PlannedRun, SweepPlan


def fmt_duration(s: float) -> str:
    """A duration in s, min or h."""
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _key(run: PlannedRun) -> tuple[str, int]:
    return (run.group, run.cfg.size if run.cfg else 0)


def estimate_left(plan: SweepPlan, state: dict[str, Any]) -> float | None:
    """Seconds of work left: each open run at the mean time of finished runs of its kind and input size,
    shared among the runs running now."""
    runs = state.get("runs", {})
    times: dict[tuple[str, int], list[float]] = {}
    for r in plan.runs:
        entry = runs.get(r.name, {})
        if entry.get("state") == "finished" and isinstance(entry.get("time_s"), (int, float)) and r.cfg:
            times.setdefault(_key(r), []).append(float(entry["time_s"]))
    every = [t for ts in times.values() for t in ts]
    left = [r for r in plan.runs if runs.get(r.name, {}).get("state") in ("pending", "running", "interrupted")]
    if not every or not left:
        return None
    total = 0.0
    for r in left:
        ts = times.get(_key(r)) or [t for (g, _), v in times.items() if g == r.group for t in v] or every
        total += sum(ts) / len(ts)
    running = sum(runs.get(r.name, {}).get("state") == "running" for r in left)
    return total / max(1, running)


class SweepProgress:
    """Shows a sweep's state as it changes: a bar and the running runs in a terminal (``bar``),
    and a line for each run that finishes or fails."""

    def __init__(self, plan: SweepPlan, bar: bool = True, console: Console | None = None) -> None:
        self.plan = plan
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.enabled = bar  # progress asked for: runs print a line per epoch even without a terminal
        self.bar = bar and self.console.is_terminal
        self.seen: dict[str, str] | None = None
        self.progress: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> SweepProgress:
        if self.bar:
            self.progress = Progress(
                TextColumn("[bold]sweep", table_column=Column(no_wrap=True, min_width=5)), BarColumn(bar_width=20),
                MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}", table_column=Column(no_wrap=True)),
                TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                console=self.console, transient=False, expand=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=len(self.plan.runs), eta="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    def say(self, text: str, markup: bool = False) -> None:
        """Print a line (above the bar, if there is one)."""
        console = self.progress.console if self.progress is not None else self.console
        console.print(text if markup else escape(text), highlight=False)

    def update(self, state: dict[str, Any]) -> None:
        """Show what changed since the last call: a line per run that ended, then the bar."""
        runs = state.get("runs", {})
        states = {r.name: runs.get(r.name, {}).get("state", "pending") for r in self.plan.runs}
        ended = sum(s in ("finished", "failed", "external") for s in states.values())
        if self.seen is not None:
            new = [n for n, st in states.items() if st in ("finished", "failed") and self.seen.get(n) != st]
            for i, name in enumerate(new, start=ended - len(new) + 1):
                self.say(f"\\[{i}/{len(states)}] {self._line(name, runs[name])}", markup=True)
        self.seen = states
        if self.progress is not None:
            running = [n for n, s in states.items() if s == "running"]
            self.progress.update(self.task, completed=ended, eta=self._eta(state),
                                 description=escape(", ".join(running)))

    @staticmethod
    def _line(name: str, entry: dict[str, Any]) -> str:
        seconds = entry.get("time_s")
        took = f", {fmt_duration(seconds)}" if isinstance(seconds, (int, float)) else ""
        if entry.get("state") == "failed":
            return f"[red]failed[/red] {escape(name)}: {escape(str(entry.get('error')))}{took}"
        top1 = entry.get("top1")
        score = f"top-1 {top1:.4f}" if isinstance(top1, (int, float)) and not math.isnan(top1) else "top-1 ?"
        return f"[green]done[/green] {escape(name)}: {score}{took}"

    def _eta(self, state: dict[str, Any]) -> str:
        left = estimate_left(self.plan, state)
        if left is None:
            return "estimating"
        text = f"~{fmt_duration(left)} left"
        budget = self.plan.budget_minutes
        if budget and (state.get("total_wall_s") or 0.0) + left > budget * 60:
            text += f" [yellow](over the {budget:g} min budget)[/yellow]"
        return text


def summary(plan: SweepPlan, state: dict[str, Any], wall_s: float, ran: int, skipped: int) -> list[str]:
    """The closing lines of a sweep: counts, wall time and each failure."""
    entries = [(r.name, state.get("runs", {}).get(r.name, {})) for r in plan.runs]
    failed = {name: e.get("error") for name, e in entries if e.get("state") == "failed"}
    n_ok = sum(e.get("state") in ("finished", "external") for _, e in entries)
    lines = [f"sweep finished in {fmt_duration(wall_s)}: {ran} ran, {skipped} were done, {len(failed)} failed "
             f"({n_ok}/{len(plan.runs)} finished); state: {plan.out / 'sweep.json'}"]
    lines += [f"  failed: {name}: {reason}" for name, reason in failed.items()]
    return lines
