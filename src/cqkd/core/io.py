"""Atomic writes and safe reads: every file cqkd writes goes through ``atomic_write``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from cqkd.errors import CqkdError

_UMASK = os.umask(0o022)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda f: yaml.safe_dump(data, f, sort_keys=False))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda f: torch.save(tensors, f), mode="wb")


def describe_load_error(e: BaseException) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)`` (without torch's advice to
    retry with ``weights_only=False``, which would execute whatever the file contains)."""
    text = str(e)
    if "Weights only load failed" in text:
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
        reason = lines[0] if lines else "not plain tensors"
        return f"not loadable as plain tensors: {reason[:120]}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a dict of tensors without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CqkdError(f"{path} does not exist") from None
    except Exception as e:
        raise CqkdError(f"{path} is corrupt or not a tensor file; refusing to load it ({describe_load_error(e)})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CqkdError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CqkdError(f"{path} is not valid JSON ({e})") from None
