"""Fault tolerance: atomic and safe checkpoints, clean interruption, and resuming a run.

Checkpoints of a run directory (``checkpoints/``)::

    last.ckpt          end of the latest epoch, after validation (Lightning's ModelCheckpoint)
    best.ckpt          the epoch with the best val/top1 (what the test split is evaluated on)
    step.ckpt          every ``checkpoint_every_n_steps`` optimizer steps (survives kill -9)
    interrupted.ckpt   written after the current step when Ctrl-C or SIGTERM arrives
    (step.ckpt and interrupted.ckpt are deleted once the run finishes)

Every checkpoint is written to a temporary file in the same directory, fsynced and renamed
into place (``AtomicCheckpointIO``), so a kill at any moment leaves the previous version
intact. Checkpoints are only ever read with ``torch.load(weights_only=True)``, which refuses
pickled code. ``--resume`` picks the most advanced of them whose cqkd version and config
digest match the run (``resume_checkpoint``).

What makes a resumed run end like an uninterrupted one:
- the training views and degradation noise come from ``step_generator(seed, global_step)``;
- the shuffling of each epoch is reseeded from ``(seed, epoch)`` (``RunGuard``);
- the global torch RNG (e.g. dropout) is stored in the checkpoint and restored;
- Lightning restores weights, optimizer, scheduler, loop counters and the best-checkpoint
  bookkeeping.
A run resumed from an epoch-end checkpoint reproduces the uninterrupted run's metrics; one
resumed from a mid-epoch checkpoint finishes correctly but sees a different subset of that
epoch's batches (Lightning cannot fast-forward a plain DataLoader).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cqkd import __version__
from cqkd.config import RunConfig
from cqkd.errors import CqkdError
from cqkd.runs import RunDir, atomic_write, describe_load_error, effective_state

CHECKPOINT_NAMES = ("last.ckpt", "interrupted.ckpt", "step.ckpt")  # tie-break order on equal steps


# ------------------------------------------------------------------------------ safe I/O

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
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


# ------------------------------------------------------------------------------ input checks

def check_data_dir(data_dir: str | None) -> None:
    """A --data-dir that exists must also be readable (load_dataset checks that it exists)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise CqkdError(f"--data-dir {data_dir!r} is not readable (permission denied)")
    try:
        next(os.scandir(data_dir), None)
    except OSError as e:
        raise CqkdError(f"--data-dir {data_dir!r} cannot be read: {e.strerror}") from None


# ------------------------------------------------------------------------------ resume

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
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CqkdError(f"{path} is corrupt or not a safetensors file ({e})") from None
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
    return int(load_checkpoint(path).get("global_step", 0))


def resume_checkpoint(run: RunDir, cfg: RunConfig) -> Path | None:
    """Check that ``run`` can be resumed with ``cfg`` and return the checkpoint to resume from
    (None when the run stopped before its first checkpoint: it then starts from scratch)."""
    where = str(run.path)
    if not run.config_file.exists():
        raise CqkdError(f"--resume: {where!r} holds no run to resume (no config.yaml); drop --resume to start one")
    if run.is_finished:
        raise CqkdError(f"--resume: the run in {where!r} is already finished; nothing to resume "
                        "(pass --force without --resume to train it again)")
    state, note = effective_state(run)
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


# ------------------------------------------------------------------------------ the callback

def shuffle_generator(loader: Any) -> torch.Generator | None:
    """Give a shuffling loader's sampler a generator of its own and return it.

    By default a DataLoader's RandomSampler shares the loader's generator, from which each new
    iterator also draws a base seed; whether that draw happens before or after the epoch's
    reseed depends on whether the run was resumed. A separate generator, reseeded from
    (seed, epoch) before each epoch, makes the order of an epoch a function of those alone.
    (Under DDP Lightning swaps in a DistributedSampler, which has its own set_epoch.)
    """
    from torch.utils.data import RandomSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler):
        sampler.generator = torch.Generator()
        return sampler.generator
    return None


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 2_147_483_629 + epoch * 65_537 + 12_345) % (2**63 - 1)


class RunGuard(L.Callback):
    """Periodic and on-interrupt checkpoints, per-epoch reseeded shuffling, RNG state.

    - every ``every_n_steps`` optimizer steps: ``step.ckpt`` (atomic; survives kill -9);
    - Ctrl-C (first one) or SIGTERM: finish the current step, write ``interrupted.ckpt`` and
      stop with ``RunInterrupted``; a second Ctrl-C aborts at once;
    - before each epoch the train sampler's generator is reseeded from (seed, epoch), so the
      order of an epoch does not depend on how many epochs this process has run;
    - the global torch RNG state is saved in and restored from the checkpoint.

    Test-only hooks (environment): ``CQKD_TEST_HANG_AT_STEP=N`` waits at step N (after its
    periodic checkpoint) until a signal arrives; ``CQKD_TEST_KILL_AFTER_EPOCH=E`` kills the
    process with SIGKILL once epoch E (1-based) and its checkpoints are complete.
    """

    def __init__(self, checkpoint_dir: Path, every_n_steps: int, seed: int, train_generator: torch.Generator | None,
                 teacher_digest: str | None = None) -> None:
        self.teacher_digest = teacher_digest
        self.checkpoint_dir = Path(checkpoint_dir)
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.train_generator = train_generator
        self.stop_signal: str | None = None
        self.saved_interrupt: str | None = None
        self.in_fit = False
        self._old_sigint: Any = None
        self._hang_at = int(os.environ.get("CQKD_TEST_HANG_AT_STEP", "0") or 0)
        self._kill_after = int(os.environ.get("CQKD_TEST_KILL_AFTER_EPOCH", "0") or 0)

    # ---- state carried by the checkpoint
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.teacher_digest:
            checkpoint["cqkd_teacher_digest"] = self.teacher_digest

    # ---- signals
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = "Ctrl-C"
        print("\ncqkd: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_fit = True
        if threading.current_thread() is threading.main_thread():
            self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.in_fit = False
        if self._old_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None

    def _requested(self, trainer: L.Trainer) -> str | None:
        if self.stop_signal:
            return self.stop_signal
        return "SIGTERM" if trainer.received_sigterm else None

    # ---- shuffling
    def _reseed(self, trainer: L.Trainer) -> None:
        if self.train_generator is not None:
            self.train_generator.manual_seed(_epoch_seed(self.seed, trainer.current_epoch))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reseed(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._kill_after and trainer.current_epoch == self._kill_after:
            # test hook: the previous epoch and its checkpoints (written by ModelCheckpoint at the end of
            # that epoch, after this callback's epoch-end hooks) are complete; die like kill -9
            os.kill(os.getpid(), signal.SIGKILL)
        self._reseed(trainer)

    # ---- checkpoints
    def save(self, trainer: L.Trainer, name: str) -> str:
        path = self.checkpoint_dir / name
        trainer.save_checkpoint(path)
        return str(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.save(trainer, "step.ckpt")
        if self._hang_at and step == self._hang_at:
            while self._requested(trainer) is None:
                time.sleep(0.02)
        why = self._requested(trainer)
        if trainer.world_size > 1:  # every rank must stop (and save, a collective) at the same step
            if trainer.strategy.reduce_boolean_decision(why is not None, all=False):
                why = why or self.stop_signal or "SIGTERM"
            else:
                why = None
        if why is not None:
            from cqkd.errors import RunInterrupted

            self.saved_interrupt = self.save(trainer, "interrupted.ckpt")
            raise RunInterrupted(why, step, self.saved_interrupt)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException itself when SIGTERM arrives outside our batch-end check
        # (e.g. during validation); the last completed step is still a consistent state to save.
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from lightning.pytorch.trainer.states import TrainerFn

        if (isinstance(exception, SIGTERMException) and self.saved_interrupt is None
                and trainer.state.fn == TrainerFn.FITTING):
            try:
                self.saved_interrupt = self.save(trainer, "interrupted.ckpt")
            except Exception:  # never mask the original exception
                self.saved_interrupt = None


# ------------------------------------------------------------------------------ training curves

def make_csv_logger(run_dir: Path, keep_before_step: int | None = None) -> Any:
    """Lightning's CSVLogger writing ``metrics.csv`` atomically (whole file, temp + rename).

    Lightning's writer deletes an existing metrics.csv when it starts and appends to it in
    place; here a resumed run keeps the rows logged before ``keep_before_step`` (the resumed
    checkpoint's global step), and a kill never leaves a torn last line.
    """
    import csv
    import io

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AtomicExperimentWriter(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            self.metrics: list[dict[str, Any]] = []
            self.metrics_keys: list[str] = []
            self.hparams: dict[str, Any] = {}
            self.log_dir = log_dir
            self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
            from lightning.fabric.utilities.cloud_io import get_filesystem

            self._fs = get_filesystem(log_dir)
            os.makedirs(log_dir, exist_ok=True)
            self.rows: list[dict[str, Any]] = []
            if keep_before_step is not None and os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    for row in csv.DictReader(f):
                        try:
                            if float(row.get("step") or 0) < keep_before_step:
                                self.rows.append({k: v for k, v in row.items() if v not in ("", None)})
                        except ValueError:
                            continue

        def save(self) -> None:
            if not self.metrics:
                return
            self.rows.extend(self.metrics)
            self.metrics = []
            keys = sorted(set().union(*self.rows))
            self.metrics_keys = keys
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            atomic_write(self.metrics_file_path, lambda f: f.write(buf.getvalue()))

    class AtomicCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AtomicExperimentWriter(log_dir=self.log_dir)
            return self._experiment

    return AtomicCSVLogger(save_dir=str(run_dir), name="", version="")


class SigtermOutsideFit:
    """While a run is set up, tested or saved (outside Lightning's fit loop, where Lightning's own
    handler and ``RunGuard`` take care of it), turn SIGTERM into ``RunInterrupted`` so that the
    run is marked failed instead of being left "running"."""

    def __init__(self, guard: "RunGuard | None" = None) -> None:
        self.guard = guard
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.guard is not None and self.guard.in_fit:
            return  # Lightning's handler (composed with this one) sets received_sigterm
        from cqkd.errors import RunInterrupted

        raise RunInterrupted("SIGTERM", 0, None)

    def __enter__(self) -> "SigtermOutsideFit":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
