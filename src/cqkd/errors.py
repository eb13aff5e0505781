"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CqkdError(Exception):
    """A problem with the user's input (bad option, missing file, finished run, ...).

    Library code raises it with a message that names the culprit; ``cqkd.cli`` turns it into
    ``cqkd: error: <message>`` on stderr and exit code 2, without a traceback.
    """


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> CqkdError:
    """An error for an unknown registry name that suggests the closest valid ones."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CqkdError(f"unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})")


def check_keys(keys: Iterable[object], known: Iterable[str], where: str, show_value: bool = False) -> None:
    """Reject the first key not in ``known`` with one line that suggests the closest known key
    (and, with ``show_value``, quotes the key's value from the mapping ``keys``)."""
    known = list(known)
    for key in keys:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            value = f" (value {keys[key]!r})" if show_value else ""  # type: ignore[index]
            raise CqkdError(f"{where}: unknown key {key!r}{value}{hint}")


class RunFailed(Exception):
    """A run that started but could not finish (e.g. the loss became NaN).

    The run directory is marked failed; the CLI prints one line and exits 1.
    """


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM after saving a resumable checkpoint.

    The run directory is marked failed (reason "interrupted"); ``--resume`` continues it.
    """

    def __init__(self, signal_name: str, step: int | None, checkpoint: str | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        if step is None:  # outside a training loop: nothing to save or resume
            super().__init__(f"interrupted by {signal_name}")
            return
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else " (no new checkpoint; --resume uses the latest one)"
        super().__init__(f"interrupted by {signal_name} at step {step}{where}")

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM (128 + 15), 130 for Ctrl-C (128 + 2), as a shell reports them."""
        return 143 if self.signal_name == "SIGTERM" else 130
