"""Fault tolerance: atomic and safe checkpoints, clean interruption, and resuming a run.

Details: docs/architecture.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cqkd import __version__
from cqkd.core.config import RunConfig
from cqkd.core.io import atomic_write, describe_load_error, safetensors_header
from cqkd.core.rundir import RunDir, effective_state
from cqkd.errors import CqkdError

CHECKPOINT_NAMES = ("last.ckpt", "interrupted.ckpt", "step.ckpt")  # tie-break order on equal steps


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint without unpickling arbitrary objects (weights_only=True)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CqkdError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:
        raise CqkdError(f"checkpoint {str(path)!r} is corrupt or not a plain-tensor checkpoint; refusing to load it "
                        f"({describe_load_error(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CqkdError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no state_dict)")
    return ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes temp-file + fsync + rename in the target directory
    and reads with ``weights_only=True`` whatever Lightning asks for.

    (Lightning's own writer goes through an fsspec transaction whose temporary file lives in
    the system temp directory and is moved without fsync: not atomic across file systems.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the checkpoint at ``path`` safely (see :func:`load_checkpoint`)."""
        return load_checkpoint(path)


def _config_differences(stored: RunConfig, requested: RunConfig) -> list[str]:
    """The settings that differ and enter the config digest (hardware knobs may change)."""
    a, b = stored.to_dict(), requested.to_dict()
    diffs = []
    for k in a:
        if a[k] == b.get(k):
            continue
        try:
            matters = stored.replace(**{k: b.get(k)}).digest() != stored.digest()
        except CqkdError:
            matters = True
        if matters:
            diffs.append(f"{k}={a[k]!r} stored, {b.get(k)!r} requested")
    return diffs


def check_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Load ``path`` safely and check that it belongs to a run of ``cfg`` with this cqkd version."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("cqkd")
    if not isinstance(meta, dict):
        raise CqkdError(f"checkpoint {str(path)!r} was not written by cqkd (no cqkd version/config digest); "
                        "refusing to resume from it")
    if meta.get("version") != __version__:
        raise CqkdError(f"checkpoint {str(path)!r} was written by cqkd {meta.get('version')}, this is cqkd "
                        f"{__version__}; a resumed run must use the same version (retrain with --force)")
    if meta.get("config_digest") != cfg.digest():
        raise CqkdError(f"checkpoint {str(path)!r} belongs to another configuration (digest "
                        f"{meta.get('config_digest')}, the run's is {cfg.digest()}); refusing to resume from it")
    return ckpt


def check_weights(path: Path, cfg: RunConfig) -> None:
    """Refuse a run's ``model.safetensors`` written by another cqkd version or for another config."""
    _, meta = safetensors_header(path)
    version, digest = meta.get("cqkd_version"), meta.get("config_digest")
    if version is not None and version != __version__:
        raise CqkdError(f"{path} was written by cqkd {version}, this is cqkd {__version__}; "
                        "evaluate it with that version or retrain the run")
    if digest is not None and digest != cfg.digest():
        raise CqkdError(f"{path} was trained with another configuration (digest {digest}) than the run's "
                        f"config.yaml ({cfg.digest()}); the run directory is inconsistent, retrain it with --force")


def check_teacher(path: Path, teacher_digest: str, teacher_path: str) -> None:
    """Refuse to resume a distillation whose teacher's weights changed since the checkpoint."""
    stored = load_checkpoint(path).get("cqkd_teacher_digest")
    if stored is not None and stored != teacher_digest:
        raise CqkdError(f"--resume: the teacher in {teacher_path!r} changed since {str(path)!r} was written "
                        f"(weights digest {stored} then, {teacher_digest} now); resuming would mix two teachers. "
                        "Start the run over with --force")


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at (0 if not recorded)."""
    return int(load_checkpoint(path).get("global_step", 0))


def resume_checkpoint(run: RunDir, cfg: RunConfig, check_state: bool = True) -> Path | None:
    """Check that ``run`` can be resumed with ``cfg`` and return the checkpoint to resume from
    (None when the run stopped before its first checkpoint: it then starts from scratch).
    ``check_state=False`` (ranks other than 0, started by rank 0) skips the "still running" check."""
    where = str(run.path)
    if not run.config_file.exists():
        raise CqkdError(f"--resume: {where!r} holds no run to resume (no config.yaml); drop --resume to start one")
    if run.is_finished:
        raise CqkdError(f"--resume: the run in {where!r} is already finished; nothing to resume "
                        "(pass --force without --resume to train it again)")
    state, note = effective_state(run) if check_state else (None, "")
    if state == "running":
        raise CqkdError(f"--resume: the run in {where!r} is still running ({note}); stop it first")
    stored = run.config()
    if stored.digest() != cfg.digest():
        diffs = _config_differences(stored, cfg) or ["(settings that enter the config digest)"]
        raise CqkdError(f"--resume: the requested configuration differs from the one stored in "
                        f"{run.config_file}: {'; '.join(diffs)}. A resumed run must continue with the same "
                        "settings: drop the differing options, or start a new run with --force")
    best: tuple[int, int, Path] | None = None
    for rank, name in enumerate(CHECKPOINT_NAMES):
        path = run.checkpoint_dir / name
        if not path.exists():
            continue
        ckpt = check_checkpoint(path, cfg)
        key = (int(ckpt.get("global_step", 0)), -rank, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]
