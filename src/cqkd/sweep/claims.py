"""Claims and heartbeats: exclusive files that say which process works on what, kept fresh by a thread."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_SIZE = 1024  # a held file is rewritten in place at this fixed length (JSON padded with spaces)


def host() -> str:
    """This machine's host name (read when asked, not at import)."""
    return socket.gethostname()


def identity() -> dict[str, Any]:
    """This process: host, pid and a token that tells it apart from a later process with the same pid."""
    return {"host": host(), "pid": os.getpid(), "token": uuid.uuid4().hex[:12]}


class HeldFile:
    """A file created with O_CREAT|O_EXCL whose JSON its holder refreshes in place (``heartbeat``)."""

    def __init__(self, path: Path, fd: int, info: dict[str, Any]) -> None:
        self.path, self.fd, self.info = path, fd, info
        self._ino = os.fstat(fd).st_ino
        self._lock = threading.Lock()  # the heartbeat thread and the worker both write

    @classmethod
    def create(cls, path: Path, **info: Any) -> HeldFile | None:
        """Create ``path`` holding ``info``; None if it exists already."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        now = time.time()
        held = cls(path, fd, {**info, "started": now, "heartbeat": now})
        held.refresh()
        return held

    def refresh(self, **changes: Any) -> None:
        """Write a fresh heartbeat (and ``changes``) into the file, through its descriptor."""
        with self._lock:
            if self.fd < 0:
                return
            self.info.update(changes, heartbeat=time.time())
            data = json.dumps(self.info).encode()
            os.pwrite(self.fd, data.ljust(max(_SIZE, len(data))), 0)

    def lost(self) -> bool:
        """Whether another process moved this file away (took the claim over)."""
        try:
            return os.stat(self.path).st_ino != self._ino
        except FileNotFoundError:
            return True

    def release(self) -> None:
        """Delete the file (unless it was taken over) and close it."""
        with self._lock:
            if self.fd < 0:
                return
            if not self.lost():
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def read_held(path: Path) -> dict[str, Any] | None:
    """A held file's content; None if it does not exist. A file caught mid-write reads as its mtime."""
    for _ in range(3):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.01)
    try:
        return {"heartbeat": path.stat().st_mtime}
    except FileNotFoundError:
        return None


def age(info: dict[str, Any]) -> float:
    """Seconds since the holder's last heartbeat."""
    return time.time() - float(info.get("heartbeat") or 0)


def take(path: Path, stale_after: float, **info: Any) -> tuple[HeldFile | None, dict[str, Any] | None]:
    """Claim ``path``: (the claim, the stale claim it replaced) or (None, the live holder).

    A claim whose heartbeat is older than ``stale_after`` seconds is renamed to a unique name
    first; only the process whose rename moved that very claim goes on to create a new one."""
    held = HeldFile.create(path, **info)
    if held is not None:
        return held, None
    old = read_held(path)
    if old is not None and age(old) < stale_after:
        return None, old
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None, old
    moved = read_held(aside) or {}
    if old is not None and moved.get("token") != old.get("token"):  # moved a newer claim: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return None, moved
    aside.unlink(missing_ok=True)
    return HeldFile.create(path, **info), old or {}


class Heartbeat:
    """A daemon thread that refreshes held files every ``interval`` seconds; ``on_lost`` hears of a lost one."""

    def __init__(self, interval: float, on_lost: Callable[[HeldFile], None]) -> None:
        self.interval, self.on_lost = interval, on_lost
        self.files: list[HeldFile] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cqkd-heartbeat", daemon=True)

    def hold(self, held: HeldFile) -> None:
        """Keep ``held`` fresh from now on."""
        with self._lock:
            self.files.append(held)

    def drop(self, held: HeldFile) -> None:
        """Stop refreshing ``held``."""
        with self._lock:
            if held in self.files:
                self.files.remove(held)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                files = list(self.files)
            for held in files:
                try:
                    if held.lost():
                        self.drop(held)
                        self.on_lost(held)
                    else:
                        held.refresh()
                except OSError:  # a hiccup of a shared file system: try again at the next beat
                    pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
