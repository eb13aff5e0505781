"""Test hook: the one fault-injection point of production code (tests only; no effect by default).

Production code calls ``point(name, at=...)`` at the places a test may want to stop it; the
plan of faults is read from the environment once, on the first call (or set with ``configure``):

    CQKD_TEST_HANG_IN=PHASE        hang at the point PHASE (data, cache, test, calibration, report, export),
                                   after printing "cqkd-test: waiting in PHASE" on stderr
    CQKD_TEST_HANG_AT_STEP=N       hang at the point "step" when at == N (after its periodic checkpoint)
    CQKD_TEST_KILL_AFTER_EPOCH=E   SIGKILL at the point "epoch" when at == E (epoch E and its
                                   checkpoints complete)

A hang waits until a signal arrives: a handler that raises ends it, or ``until()`` turns true
(for signal handlers that only set a flag, as Lightning's does during the training steps).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

HANG_IN, HANG_AT_STEP, KILL_AFTER_EPOCH = "CQKD_TEST_HANG_IN", "CQKD_TEST_HANG_AT_STEP", "CQKD_TEST_KILL_AFTER_EPOCH"


@dataclass(frozen=True)
class Fault:
    """One planned fault: ``action`` ("hang" or "kill") at the point ``name`` (when ``at`` matches, if set)."""
    name: str
    action: str
    at: int | None = None


_plan: tuple[Fault, ...] | None = None  # read once, on first use


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0") or 0)
    except ValueError:
        return 0


def configure(env: Mapping[str, str] | None = None) -> tuple[Fault, ...]:
    """Set the plan from ``env`` (default: the process environment); returns it."""
    global _plan
    env = os.environ if env is None else env
    faults = []
    if env.get(HANG_IN):
        faults.append(Fault(env[HANG_IN], "hang"))
    if _int(env, HANG_AT_STEP) > 0:
        faults.append(Fault("step", "hang", _int(env, HANG_AT_STEP)))
    if _int(env, KILL_AFTER_EPOCH) > 0:
        faults.append(Fault("epoch", "kill", _int(env, KILL_AFTER_EPOCH)))
    _plan = tuple(faults)
    return _plan


def point(name: str, at: int | None = None, until: Callable[[], bool] | None = None) -> None:
    """Test hook: carry out the fault planned at ``name`` (and ``at``), if any; otherwise return at once."""
    plan = configure() if _plan is None else _plan
    for fault in plan:
        if fault.name != name or (fault.at is not None and fault.at != at):
            continue
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"cqkd-test: waiting in {name}" + ("" if at is None else f" at {at}"), file=sys.stderr, flush=True)
        while until is None or not until():
            time.sleep(0.02)
