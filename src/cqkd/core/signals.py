"""SIGTERM as an exception, like Ctrl-C's KeyboardInterrupt: whatever phase a command is in, it
stops there, its ``finally`` and ``except`` blocks run (temporary files go), and it exits 143."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from cqkd.errors import RunInterrupted

HANG_ENV = "CQKD_TEST_HANG_IN"  # test hook: wait in this phase until a signal arrives


def raise_on_sigterm(signum: int = signal.SIGTERM, frame: Any = None) -> None:
    """A SIGTERM handler: raise ``RunInterrupted("SIGTERM")`` where the main thread is."""
    raise RunInterrupted("SIGTERM", None, None)


def install_sigterm_handler() -> Any:
    """Make SIGTERM raise ``RunInterrupted`` in this process (main thread only); returns the
    previous handler (None outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_on_sigterm)


def hang_if_asked(phase: str) -> None:
    """Test hook: with ``CQKD_TEST_HANG_IN=phase``, say so on stderr and wait here for a signal."""
    if os.environ.get(HANG_ENV) != phase:
        return
    print(f"cqkd-test: waiting in {phase}", file=sys.stderr, flush=True)
    while True:
        time.sleep(0.02)
