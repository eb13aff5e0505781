"""Trackers (TensorBoard, MLflow) beside metrics.csv, read back with each tool's own reader; a live sweep status."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY, cli_env, cqkd_cmd

from cqkd.cli import main
from cqkd.core.config import RunConfig
from cqkd.core.io import read_json
from cqkd.errors import CqkdError
from cqkd.sweep.plan import load_sweep
from cqkd.sweep.runner import run_sweep
from cqkd.train.fit import fit_run
from cqkd.train.trackers import SafeLogger

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

SERVER_START_S = 120  # the bound on starting `mlflow server` (about 60 s on a loaded 2-core machine)
FINAL = ("test/top1", "test/ece", "test/nll", "test/entropy")


@pytest.fixture(autouse=True)
def _quick_mlflow_retries(monkeypatch):
    """An unreachable server fails in seconds (set here so that the test process's environment is restored)."""
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():
        monkeypatch.setenv(key, value)


def _student(teacher: Path, **kw) -> RunConfig:
    return RunConfig.from_dict({**TINY, "kind": "distill", "teacher": str(teacher), "size": 7, **kw})


def _csv_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {key: [(step, value), ...]} (the reference a tracker must match)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value:
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def _mlflow_run(uri: str, experiment: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.run = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def _check_mlflow(client, run, run_dir: Path, cfg: RunConfig) -> None:
    """Params = the resolved config, each metrics.csv series with its steps, lr per epoch, final test metrics."""
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["alpha"] == "0.5" and params["temperature"] == "4.0" and params["size"] == "7"
    assert params["teacher"] == cfg.teacher and params["logger"] == cfg.logger and params["data_dir"] == "none"
    assert len(params) == len(cfg.to_dict())
    series = _csv_series(run_dir)
    assert {"train/loss", "train/ce", "train/kl", "val/top1", "val/nll"} <= set(series)
    for key, points in series.items():
        assert [(s, pytest.approx(v)) for s, v in _history(client, run, key)] == points, key
    assert len(_history(client, run, "lr-AdamW")) >= cfg.epochs  # at least once an epoch
    metrics = read_json(run_dir / "metrics.json")
    for key in FINAL:
        assert run.data.metrics[key] == pytest.approx(metrics[key.split("/")[1]]), key


def test_logger_option_is_parsed_checked_and_outside_the_digest():
    cfg = RunConfig.from_dict({**TINY, "logger": "tensorboard, mlflow,tensorboard"})
    assert cfg.logger == "csv,tensorboard,mlflow"  # metrics.csv is always written; duplicates dropped
    assert cfg.digest() == RunConfig.from_dict(TINY).digest()
    assert cfg.replace(tracking_uri="http://x:1").digest() == cfg.digest()
    with pytest.raises(CqkdError, match="logger='csv,tensorbored'"):
        RunConfig.from_dict({**TINY, "logger": "csv,tensorbored"})


def test_tensorboard_and_local_mlflow_hold_every_scalar_with_its_step(tiny_teacher, tmp_path):
    out = tmp_path / "student"
    cfg = _student(tiny_teacher, epochs=2, logger="tensorboard,mlflow")
    metrics = fit_run(cfg, out, progress=False)
    scalars = _tensorboard_scalars(out / "tensorboard" / "version_0")
    series = _csv_series(out)
    assert {"train/loss", "train/ce", "train/kl", "val/top1", "val/nll"} <= set(series)
    for key, points in series.items():  # 2 epochs: each epoch-level value once, at the step it was logged
        assert len(points) == 2 and [(s, pytest.approx(v)) for s, v in scalars[key]] == points, key
    assert len(scalars["lr-AdamW"]) >= 2
    steps = max(s for s, _ in series["val/top1"]) + 1  # the last validation logs at global step - 1
    for key in FINAL:
        assert scalars[key] == [(steps, pytest.approx(metrics[key.split("/")[1]]))], key
    # the default MLflow store is a SQLite file inside the run (nothing written elsewhere)
    assert (out / "mlflow.db").is_file()
    client, run = _mlflow_run(f"sqlite:///{out / 'mlflow.db'}", "cqkd", out.name)
    _check_mlflow(client, run, out, cfg)
    assert run.data.tags["run"] == out.name


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard log directory, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend store: its URI and its process (started
    once for this module; the last test that uses it stops it)."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", (tmp_path / "artifacts").as_uri()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"mlflow server not up within {SERVER_START_S} s"
            time.sleep(0.5)
        yield uri, proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_a_distillation_against_a_real_mlflow_server(tiny_teacher, tmp_path, mlflow_server):
    uri, _ = mlflow_server
    out = tmp_path / "student-server"
    cfg = _student(tiny_teacher, logger="mlflow", tracking_uri=uri)
    fit_run(cfg, out, progress=False)
    assert not (out / "mlflow.db").exists()  # asked for a server: nothing local
    client, run = _mlflow_run(uri, "cqkd", out.name)
    _check_mlflow(client, run, out, cfg)


def test_a_server_stopped_mid_run_loses_nothing_but_the_tracker(tiny_teacher, tmp_path, mlflow_server, monkeypatch,
                                                                 capsys):
    uri, proc = mlflow_server
    original = SafeLogger.log_metrics

    def stop_at_first_validation(self, metrics, step=None):
        if "val/top1" in metrics and proc.poll() is None:
            _stop(proc)  # the server is gone before the run's first validation reaches it
        original(self, metrics, step=step)

    monkeypatch.setattr(SafeLogger, "log_metrics", stop_at_first_validation)
    out = tmp_path / "student-stopped"
    metrics = fit_run(_student(tiny_teacher, epochs=2, logger="mlflow", tracking_uri=uri), out, progress=False)
    assert proc.poll() is not None
    stored = read_json(out / "metrics.json")
    assert stored == metrics and {"top1", "ece", "nll", "entropy", "teacher_metrics"} <= set(stored)
    assert read_json(out / "status.json")["state"] == "finished"
    assert len(_csv_series(out)["val/top1"]) == 2 and (out / "model.safetensors").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logger failed" in line]
    assert len(warnings) == 1 and "the mlflow logger failed" in warnings[0], warnings  # reported once


def test_a_missing_extra_is_one_line_and_exit_2_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if cqkd[mlflow] were not installed
    out = tmp_path / "run"
    code = main(["train", "--dataset", "synthetic", "--train-samples", "100", "--epochs", "1", "--accelerator", "cpu",
                 "--logger", "tensorboard", "--logger", "mlflow", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--logger mlflow" in err[0] and "pip install 'cqkd[mlflow]'" in err[0]
    assert not out.exists()
    sweep = _write(tmp_path / "sweep.yaml", {"base": {**TINY, "logger": "mlflow"}, "supervised": {"size": 7}})
    code = main(["sweep", str(sweep), "--out", str(tmp_path / "grid"), "--quiet"])  # before any worker starts
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'cqkd[mlflow]'" in err[0], err
    assert not (tmp_path / "grid" / "sweep.json").exists()


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_sweep_shares_one_store_and_tags_its_grid_points(tmp_path):
    spec = {"base": {**TINY, "train_samples": 200, "logger": "mlflow"},
            "supervised": {"model": "cnn-small", "size": [7, 14], "seed": 0}}
    out = tmp_path / "grid"
    result = run_sweep(load_sweep(_write(tmp_path / "sweep.yaml", spec), out), progress=False, print_fn=lambda s: None)
    assert result.ok and len(result.ran) == 2
    assert (out / "mlflow.db").is_file() and not any(out.glob("supervised/*/mlflow.db"))
    for size in (7, 14):
        name = f"supervised/model=cnn-small,size={size},seed=0"
        _, run = _mlflow_run(f"sqlite:///{out / 'mlflow.db'}", "grid", name)
        tags = run.data.tags
        assert {k: tags.get(k) for k in ("sweep", "group", "model", "size", "seed")} == \
            {"sweep": "grid", "group": "supervised", "model": "cnn-small", "size": str(size), "seed": "0"}
        assert run.info.run_name == name and run.data.params["size"] == str(size)


def test_sweep_status_shows_a_running_runs_epoch_and_val_top1_and_a_resumed_run_keeps_its_tracker_runs(
        tmp_path, capsys):
    spec = {"base": {**TINY, "train_samples": 200, "epochs": 3, "logger": "tensorboard,mlflow"},
            "supervised": {"model": "cnn-small", "size": 7}}
    cfg = _write(tmp_path / "sweep.yaml", spec)
    out = tmp_path / "out"
    env = {**cli_env(), "CQKD_TEST_KILL_AFTER_EPOCH": "1", "OMP_NUM_THREADS": "1"}  # kill -9 after epoch 1
    done = subprocess.run(cqkd_cmd("sweep", str(cfg), "--out", str(out), "--quiet"), env=env, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == -signal.SIGKILL, done.stdout
    name = "supervised/model=cnn-small,size=7,seed=0"
    with open(out / name / "metrics.csv", newline="") as f:
        top1 = [float(r["val/top1"]) for r in csv.DictReader(f) if r.get("val/top1")]
    assert len(top1) == 1  # killed after its first epoch: still 'running' in sweep.json
    assert main(["sweep", "--status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "1 running" in shown and "1/3" in shown and f"{top1[0]:.4f}" in shown, shown
    # the sweep resumes the run from its epoch-1 checkpoint: the same MLflow run and TensorBoard directory go on
    result = run_sweep(load_sweep(cfg, out), progress=False, print_fn=lambda s: None, stale_after=1)
    assert result.ok and result.ran == [name]
    series = _csv_series(out / name)
    assert len(series["val/top1"]) == 3
    client, run = _mlflow_run(f"sqlite:///{out / 'mlflow.db'}", "out", name)  # exactly one run of that name
    assert run.info.status == "FINISHED"
    for key in ("val/top1", "train/loss"):
        assert [(s, pytest.approx(v)) for s, v in _history(client, run, key)] == series[key], key
    assert [p.name for p in (out / name / "tensorboard").iterdir()] == ["version_0"]
    scalars = _tensorboard_scalars(out / name / "tensorboard" / "version_0")
    assert [(s, pytest.approx(v)) for s, v in scalars["val/top1"]] == series["val/top1"]
