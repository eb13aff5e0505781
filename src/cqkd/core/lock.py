"""One writer at a time: an exclusive OS lock (flock) on a lock file, held by a process until it
releases it or dies (the kernel then releases it). Runs, sweeps and teacher caches all use ``acquire``."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cqkd.core.progress import say
from cqkd.errors import CqkdError

_HELD: dict[str, "Lock"] = {}  # lock files this process holds, by real path (re-entrant)
PATIENCE_S = 1.0  # a lock held this briefly (someone probing it) is waited for, not reported


class Lock:
    """A held lock; ``release()`` (or leaving the ``with`` block) lets it go."""

    def __init__(self, path: Path, key: str, fd: int) -> None:
        self.path, self.key, self.fd, self.count = path, key, fd, 1

    def release(self) -> None:
        """Release one hold; the lock goes when the last is released."""
        self.count -= 1
        if self.count == 0:
            _HELD.pop(self.key, None)
            os.close(self.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def holder(path: str | os.PathLike) -> str:
    """Who holds (or last held) the lock file ``path``: "pid N on HOST since TIME"."""
    try:
        info = json.loads(Path(path).read_text())
        return f"pid {int(info['pid'])} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def acquire(path: str | os.PathLike, what: str, wait: bool = False) -> Lock:
    """Take the exclusive lock ``path`` (created if needed) for ``what`` (e.g. "run directory 'x'").

    Held: a ``CqkdError`` naming the holder, or with ``wait`` a message and a wait for it. I/O
    problems (a read-only directory) raise ``OSError``."""
    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock(fd, path, what, wait)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.write(fd, json.dumps(info).encode())
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = Lock(path, key, fd)
    return _HELD[key]


def _lock(fd: int, path: Path, what: str, wait: bool) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if not wait:
                raise CqkdError(f"{what} is in use by another cqkd process ({holder(path)}); "
                                "wait for it to end, or stop it") from None
            say(f"cqkd: waiting for {what}, in use by {holder(path)}")
            fcntl.flock(fd, fcntl.LOCK_EX)  # a signal still interrupts the wait
            return


def holds(path: str | os.PathLike) -> bool:
    """True while this process holds the lock file ``path``."""
    return os.path.realpath(path) in _HELD


def is_held(path: str | os.PathLike) -> bool:
    """True while some process (this one included) holds the lock file ``path``."""
    if holds(path):
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
