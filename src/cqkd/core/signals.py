"""SIGTERM as an exception, like Ctrl-C's KeyboardInterrupt: whatever phase a command is in, it
stops there, its ``finally`` and ``except`` blocks run (temporary files go), and it exits 143."""

from __future__ import annotations

import signal
import threading
from typing import Any

from cqkd.errors import RunInterrupted


def raise_on_sigterm(signum: int = signal.SIGTERM, frame: Any = None) -> None:
    """A SIGTERM handler: raise ``RunInterrupted("SIGTERM")`` where the main thread is."""
    raise RunInterrupted("SIGTERM", None, None)


def install_sigterm_handler() -> Any:
    """Make SIGTERM raise ``RunInterrupted`` in this process (main thread only); returns the
    previous handler (None outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_on_sigterm)
