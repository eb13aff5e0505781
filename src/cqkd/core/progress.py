"""Progress of long work, one way everywhere: a live rich bar in a terminal, a plain line now and
then when output goes to a file or a pipe (so a log shows that work goes on)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

LINE_EVERY_S = 30.0  # without a terminal: at most one progress line per this many seconds
NOTE_EVERY_S = 0.5  # in a terminal: the note beside the bar is refreshed at most this often


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default: stderr) is an interactive terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def say(message: str, stream: TextIO | None = None) -> None:
    """One line of progress or status on stderr (flushed at once)."""
    print(message, file=stream or sys.stderr, flush=True)


class Progress:
    """A counter of ``total`` units of work named ``desc``.

    In a terminal it draws a rich progress bar (removed when done); otherwise it prints
    ``desc: done/total (pct), elapsed, eta`` at most every ``LINE_EVERY_S`` seconds and once at
    the end. ``enabled=False`` prints nothing. Use as a context manager.
    """

    def __init__(self, total: int, desc: str, unit: str = "", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last_line = self.start
        self._last_note = 0.0
        self._bar: Any = None
        self._task: Any = None
        if enabled and is_terminal(self.stream):
            self._open_bar()

    def _open_bar(self) -> None:
        bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=self.stream),
                           transient=True)
        try:
            bar.start()
        except LiveError:  # another live display (e.g. a sweep's) owns the terminal: plain lines
            return
        self._bar, self._task = bar, bar.add_task(self.desc, total=self.total or None)

    def update(self, n: int = 1, note: str | Callable[[], str] = "") -> None:
        """Count ``n`` more units done; ``note`` (e.g. the current loss, or a function giving it,
        called only when shown) is shown beside the bar at most every ``NOTE_EVERY_S`` seconds."""
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            show = now - self._last_note >= NOTE_EVERY_S
            if show:
                self._last_note = now
                text = note() if callable(note) else note
                self._bar.update(self._task, advance=n, description=f"{self.desc} {text}".rstrip())
            else:
                self._bar.update(self._task, advance=n)
            return
        if now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            say(self._line(note() if callable(note) else note), self.stream)

    def _line(self, note: str = "") -> str:
        elapsed = time.monotonic() - self.start
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and 0 < self.done < self.total:
            eta = f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.desc}: {self.done}/{self.total or '?'}{unit}{pct}, {elapsed:.0f} s{eta}" + (f"; {note}" if note else "")

    def close(self) -> None:
        """Remove the bar (in a terminal)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
