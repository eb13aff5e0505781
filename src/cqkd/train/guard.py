"""Signals, interruption checkpoints and per-epoch reseeding during a fit."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import RandomSampler

from cqkd.core import faults
from cqkd.data.folder import BankSampler
from cqkd.errors import RunInterrupted


def shuffle_generator(loader: Any) -> torch.Generator | None:
    """Give a shuffling loader's sampler a generator of its own and return it.

    By default a DataLoader's RandomSampler shares the loader's generator, from which each new
    iterator also draws a base seed; whether that draw happens before or after the epoch's
    reseed depends on whether the run was resumed. A separate generator, reseeded from
    (seed, epoch) before each epoch, makes the order of an epoch a function of those alone.
    (Under DDP Lightning swaps in a DistributedSampler, which has its own set_epoch.)
    """

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, (RandomSampler, BankSampler)) and getattr(sampler, "shuffle", True):
        sampler.generator = torch.Generator()
        return sampler.generator
    return None


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 2_147_483_629 + epoch * 65_537 + 12_345) % (2**63 - 1)


class RunGuard(L.Callback):
    """Periodic and on-interrupt checkpoints, per-epoch reseeded shuffling, RNG state.

    - every ``every_n_steps`` optimizer steps: ``step.ckpt`` (atomic; survives kill -9);
    - Ctrl-C (first one) or SIGTERM during the training steps: finish the current step, write
      ``interrupted.ckpt`` and stop with ``RunInterrupted``; a second Ctrl-C aborts at once;
      before the steps (e.g. while the teacher cache is built) either one stops at once;
    - before each epoch the train sampler's generator is reseeded from (seed, epoch), so the
      order of an epoch does not depend on how many epochs this process has run;
    - the global torch RNG state is saved in and restored from the checkpoint.

    Test hooks (``cqkd.core.faults``): the points "step" (after a step's periodic checkpoint,
    waiting until a signal is asked for) and "epoch" (at the start of an epoch, once the previous
    one and its checkpoints are complete).
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
        self.in_steps = False  # between on_train_start and on_train_end: stop after the current step
        self._old_sigint: Any = None

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
        if not self.in_steps:  # no step to finish: stop where we are
            raise RunInterrupted("Ctrl-C", None, None)
        self.stop_signal = "Ctrl-C"
        print("\ncqkd: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigint()

    def _take_sigint(self) -> None:
        if self._old_sigint is None and threading.current_thread() is threading.main_thread():
            self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.in_steps = False
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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a loader with workers draws the first epoch's order when its iterator is made, which
        # happens before on_train_start (e.g. when the one-cycle schedule counts the batches)
        if stage == "fit":
            self._reseed(trainer)
            self._take_sigint()  # the teacher cache is built in the module's setup, right after this

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_steps = True  # Lightning's SIGTERM handler is in place from here on
        self._reseed(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.in_steps = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the previous epoch and its checkpoints (written by ModelCheckpoint at the end of that epoch,
        # after this callback's epoch-end hooks) are complete here
        faults.point("epoch", at=trainer.current_epoch)
        self._reseed(trainer)

    # ---- checkpoints
    def save(self, trainer: L.Trainer, name: str) -> str:
        """Save the trainer's checkpoint as ``name`` in the checkpoint directory; returns its path."""
        path = self.checkpoint_dir / name
        trainer.save_checkpoint(path)
        return str(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.save(trainer, "step.ckpt")
        faults.point("step", at=step, until=lambda: self._requested(trainer) is not None)
        why = self._requested(trainer)
        if trainer.world_size > 1:  # every rank must stop (and save, a collective) at the same step
            if trainer.strategy.reduce_boolean_decision(why is not None, all=False):
                why = why or self.stop_signal or "SIGTERM"
            else:
                why = None
        if why is not None:

            self.saved_interrupt = self.save(trainer, "interrupted.ckpt")
            raise RunInterrupted(why, step, self.saved_interrupt)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException itself when SIGTERM arrives outside our batch-end check
        # (e.g. during validation); the last completed step is still a consistent state to save.

        if (isinstance(exception, SIGTERMException) and self.saved_interrupt is None
                and trainer.state.fn == TrainerFn.FITTING):
            try:
                self.saved_interrupt = self.save(trainer, "interrupted.ckpt")
            except Exception:  # never mask the original exception
                self.saved_interrupt = None


class SigtermOutsideFit:
    """While a run is set up, builds its teacher cache, is tested or saved (outside the training
    steps, where Lightning's own handler and ``RunGuard`` stop after the current step), turn
    SIGTERM into ``RunInterrupted`` at once so that the run is marked failed, not left "running"."""

    def __init__(self, guard: "RunGuard | None" = None) -> None:
        self.guard = guard
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.guard is not None and self.guard.in_steps:
            return  # Lightning's handler (composed with this one) sets received_sigterm
        raise RunInterrupted("SIGTERM", None, None)

    def __enter__(self) -> "SigtermOutsideFit":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
