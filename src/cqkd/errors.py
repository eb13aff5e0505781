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
