"""What every ``cqkd`` command shares: exit statuses and one-line messages."""

from __future__ import annotations

EXIT_FAILED = 1  # a run failed (its error on one line)
EXIT_USAGE = 2  # a user mistake: bad option, missing file, ... (one line, nothing written)
EXIT_SKIPPED = 3  # cqkd predict --skip-bad-images: some files were unreadable, the rest predicted


def one_line(text: str) -> str:
    """``text`` on one line (a message is never allowed to spill over several)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())
