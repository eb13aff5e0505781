"""Trackers a run logs to besides its metrics.csv: TensorBoard, MLflow, Weights & Biases (optional extras).

Each is Lightning's own logger, wrapped so that a tracker failing mid-run (server gone, disk full)
is reported once on stderr and then left alone: the run finishes and its own files complete.
How to open them: docs/trackers.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from cqkd.core.config import RunConfig
from cqkd.core.io import read_json, write_json
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError

TRACKERS = ("tensorboard", "mlflow", "wandb")  # each is also the module it needs and the name of its extra
FINAL_METRICS = ("top1", "ece", "nll", "entropy")  # the test metrics a tracker receives at the end, as test/<name>
TRACKERS_FILE = "trackers.json"  # the trackers' run ids, so that a resumed run continues its tracker runs
MLFLOW_STORE = "mlflow.db"  # the default MLflow store (SQLite) in the run's or the sweep's directory
# MLflow retries an unreachable server for minutes by default; a run waits that long once at most
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@dataclass
class Tracking:
    """How a run's trackers name, tag and place it: a lone run uses its own directory, a sweep passes
    its directory (one MLflow store, one experiment) and the run's grid point as tags."""

    store_dir: Path | None = None  # where the default MLflow store and W&B's caches lie (None: the run directory)
    experiment: str = "cqkd"
    tags: dict[str, str] = field(default_factory=dict)


def tracker_names(cfg: RunConfig) -> list[str]:
    """The trackers ``cfg.logger`` asks for (metrics.csv is always written and is not one)."""
    return [n for n in cfg.logger.split(",") if n in TRACKERS]


def check_trackers(cfg: RunConfig) -> None:
    """Raise ``CqkdError`` naming the extra to install if a tracker ``cfg`` asks for is not installed."""
    for name in tracker_names(cfg):
        try:
            importlib.import_module(name)  # optional backend: imported only when asked for
        except ImportError:
            raise CqkdError(f"--logger {name}: {name} is not installed; install it with "
                            f"pip install 'cqkd[{name}]'") from None


def init_mlflow_store(store_dir: Path, experiment: str) -> None:
    """Create the local MLflow store in ``store_dir`` and its ``experiment`` once, before a sweep's workers
    start (so that they do not race to create its tables); a failure is each run's to report."""
    from mlflow.tracking import MlflowClient  # noqa: I001 - optional backend: imported only when asked for

    home = Path(store_dir).resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(f"sqlite:///{home / MLFLOW_STORE}")
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=(home / "mlartifacts").as_uri())
    except Exception:  # noqa: BLE001  (the runs report it once each, and go on without MLflow)
        pass


def tracker_params(cfg: RunConfig) -> dict[str, Any]:
    """The run's resolved configuration as a tracker's hyperparameters (None as 'none')."""
    return {k: "none" if v is None else v for k, v in cfg.to_dict().items()}


def make_trackers(cfg: RunConfig, run_dir: Path, tracking: Tracking | None = None,
                  resume: bool = False) -> list["SafeLogger"]:
    """Lightning loggers for the trackers ``cfg`` asks for, each writing under ``run_dir`` unless told
    otherwise, with the run's configuration logged as hyperparameters. A resumed run continues the
    tracker runs it started (their ids are in ``trackers.json``); a fresh start begins new ones."""
    tracking = tracking or Tracking()
    run_dir = Path(run_dir).resolve()
    name = tracking.tags.get("run", run_dir.name)
    tags = {"run": name, **tracking.tags}
    previous = {**_previous_ids(run_dir), "resume": True} if resume else {}
    made = []
    for tracker in tracker_names(cfg):
        build = _BUILDERS[tracker]
        made.append(SafeLogger(tracker, lambda b=build: b(cfg, run_dir, tracking, name, tags, previous)))
    params = tracker_params(cfg)
    for logger in made:
        logger.log_hyperparams(params)
    _save_ids(run_dir, made)
    return made


def _previous_ids(run_dir: Path) -> dict[str, Any]:
    """The tracker run ids a run recorded (none if it recorded none, or the file is unreadable)."""
    try:
        if TRACKERS_FILE in RunDir(run_dir).owned() and (run_dir / TRACKERS_FILE).is_file():
            return read_json(run_dir / TRACKERS_FILE)
    except CqkdError:
        pass
    return {}


@rank_zero_only
def _save_ids(run_dir: Path, trackers: list["SafeLogger"]) -> None:
    ids = {}
    for logger in trackers:
        inner = logger.inner
        if logger.tracker == "mlflow" and inner is not None and getattr(inner, "_run_id", None):
            ids["mlflow"] = {"tracking_uri": inner._tracking_uri, "run_id": inner._run_id}
        elif logger.tracker == "wandb" and inner is not None and logger.failed is None:
            ids["wandb"] = {"id": logger.version}
    if ids:
        try:
            RunDir(run_dir).claim(TRACKERS_FILE)
            write_json(run_dir / TRACKERS_FILE, ids)
        except CqkdError as e:  # only a resumed run's continuity is lost
            print(f"cqkd: warning: {e}; a resumed run will start new tracker runs", file=sys.stderr, flush=True)


def log_final(trackers: list["SafeLogger"], cfg: RunConfig, metrics: dict[str, Any], step: int) -> None:
    """Give each tracker the run's final test metrics (``test/top1`` ...) at ``step``, then close it."""
    final = {f"test/{k}": float(metrics[k]) for k in FINAL_METRICS if isinstance(metrics.get(k), (int, float))}
    for logger in trackers:
        if logger.tracker == "tensorboard":  # its HPARAMS tab: the configuration beside the final metrics
            logger.log_hyperparams(tracker_params(cfg), metrics=final, step=step)
        else:
            logger.log_metrics(final, step=step)
        logger.finalize("success")


def _tensorboard(cfg: RunConfig, run_dir: Path, tracking: Tracking, name: str, tags: dict[str, str],
                 previous: dict[str, Any]) -> Logger:
    from lightning.pytorch.loggers import (
        TensorBoardLogger,  # optional backend: imported only when asked for
    )

    # tensorboard/version_N: a fresh start takes the next N (nothing of an earlier attempt is deleted), a resumed
    # run its last one (TensorBoard drops the events past the step a run resumes from)
    versions = sorted(int(p.name[8:]) for p in (run_dir / "tensorboard").glob("version_*") if p.name[8:].isdigit())
    version = versions[-1] if previous.get("resume") and versions else None
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=version, default_hp_metric=False)


def _mlflow(cfg: RunConfig, run_dir: Path, tracking: Tracking, name: str, tags: dict[str, str],
            previous: dict[str, Any]) -> Logger:
    from lightning.pytorch.loggers import (
        MLFlowLogger,  # optional backend: imported only when asked for
    )

    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # read by MLflow at each request; the user's settings win
        os.environ.setdefault(key, value)
    artifacts = None
    uri = cfg.tracking_uri
    if uri is None:  # a local store: nothing goes elsewhere unasked (artifacts too)
        home = Path(tracking.store_dir or run_dir).resolve()
        uri = f"sqlite:///{home / MLFLOW_STORE}"
        artifacts = (home / "mlartifacts").as_uri()
    before = previous.get("mlflow") or {}
    run_id = before.get("run_id") if before.get("tracking_uri") == uri else None  # the same store: continue
    return MLFlowLogger(experiment_name=tracking.experiment, run_name=name, tracking_uri=uri, tags=dict(tags),
                        artifact_location=artifacts, run_id=run_id)


def _wandb(cfg: RunConfig, run_dir: Path, tracking: Tracking, name: str, tags: dict[str, str],
           previous: dict[str, Any]) -> Logger:
    from lightning.pytorch.loggers import (
        WandbLogger,  # optional backend: imported only when asked for
    )

    # offline unless the user configures W&B (WANDB_MODE=online, or a mode of their choosing)
    offline = "WANDB_MODE" not in os.environ
    if offline:  # its logs and caches in the run's (or the sweep's) directory, not in ~ (the user's settings win)
        home = Path(tracking.store_dir or run_dir).resolve() / "wandb"
        for key, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
            os.environ.setdefault(key, str(home / sub))
    before = (previous.get("wandb") or {}).get("id")
    resumed = {"id": before, "resume": "allow"} if before else {}
    return WandbLogger(name=name, save_dir=str(run_dir), project=tracking.experiment, offline=offline,
                       tags=[f"{k}={v}"[:64] for k, v in tags.items()], config={"tags": tags}, **resumed)


class TrackerLR(LearningRateMonitor):
    """Lightning's LearningRateMonitor (``lr-<Optimizer>`` at each epoch's start and every
    ``log_every_n_steps`` steps) logging to the trackers only, so that metrics.csv keeps its columns."""

    def __init__(self, trackers: list["SafeLogger"]) -> None:
        super().__init__()
        self.trackers = trackers

    def on_train_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        if trainer._logger_connector.should_update_logs:  # as LearningRateMonitor does
            self._log(trainer, self._extract_stats(trainer, "step"))

    def on_train_epoch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._log(trainer, self._extract_stats(trainer, "any"))  # at least once an epoch, whatever the interval

    def _log(self, trainer: Any, stats: dict[str, float]) -> None:
        if stats:
            for logger in self.trackers:
                logger.log_metrics(stats, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


_BUILDERS: dict[str, Callable[..., Logger]] = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}


class SafeLogger(Logger):
    """A tracker's Lightning logger whose first failure is reported once (one line on stderr) and whose
    later calls are skipped, so that a tracker never stops a run. Built on first use."""

    def __init__(self, tracker: str, build: Callable[[], Logger]) -> None:
        super().__init__()
        self.tracker = tracker
        self._build = build
        self._inner: Logger | None = None
        self.failed: str | None = None

    def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            if self._inner is None:
                self._inner = self._build()
            return getattr(self._inner, what)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (any failure of a tracker: network, disk, its own bugs)
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            self.failed = f"{type(e).__name__}: {reason}"
            print(f"cqkd: warning: the {self.tracker} logger failed ({self.failed}); the run goes on without it",
                  file=sys.stderr, flush=True)
            return None

    @property
    def inner(self) -> Logger | None:
        """The wrapped Lightning logger (None before first use or if building it failed)."""
        return self._inner

    @property
    def name(self) -> str | None:
        value = self._call("__getattribute__", "name")
        return None if value is None else str(value)

    @property
    def version(self) -> str | int | None:
        return self._call("__getattribute__", "version")

    @property
    def save_dir(self) -> str | None:
        return self._call("__getattribute__", "save_dir")

    @property
    def experiment(self) -> Any:
        return self._call("__getattribute__", "experiment")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._call("log_hyperparams", params, *args, **kwargs)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        return None  # no model graphs: a run's curves and settings only

    def save(self) -> None:
        self._call("save")

    def finalize(self, status: str) -> None:
        self._call("finalize", status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        return None  # checkpoints stay in the run directory; no tracker uploads them
