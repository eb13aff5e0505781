"""Many workers on one sweep directory: claims, take-over of a killed worker, local processes, Ray."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, cqkd_cmd

from cqkd.cli import main
from cqkd.core.io import read_json
from cqkd.core.rundir import RunDir
from cqkd.sweep.claims import Heartbeat, identity, take
from cqkd.sweep.plan import load_sweep, weights_digest
from cqkd.sweep.runner import run_sweep
from cqkd.sweep.state import SweepDir, load_state

TINY = {"dataset": "synthetic", "train_samples": 200, "epochs": 1, "accelerator": "cpu"}
SMALL = {"base": TINY, "teachers": {"t28": {"model": "cnn-small", "size": 28}},
         "supervised": {"model": "cnn-small", "size": 7},
         "distill": {"teacher": "t28", "model": "cnn-small", "size": 7, "temperature": [1, 4]}}


@pytest.fixture(autouse=True)
def deadline():
    """Fail a test whose workers wait for ever (e.g. for a claim that is never taken over)."""
    def expire(signum, frame):
        raise TimeoutError("the sweep did not end within 600 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(600)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _write(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def _running(out: Path, name: str) -> bool:
    return load_state(out)["runs"].get(name, {}).get("state") == "running"


def test_a_live_claim_is_respected_a_stale_one_taken_over(tmp_path):
    path = tmp_path / "claims" / "run.json"
    first, previous = take(path, 60, **identity(), claim="run")
    assert first is not None and previous is None
    second, holder = take(path, 60, **identity(), claim="run")
    assert second is None and holder["token"] == first.info["token"]
    lost = []
    with Heartbeat(0.01, lost.append) as beat:
        beat.hold(first)
        third, previous = take(path, 0.0, **identity(), claim="run")  # every claim is stale after 0 s
        assert third is not None and previous["token"] == first.info["token"]
        deadline = time.time() + 10
        while not lost and time.time() < deadline:
            time.sleep(0.01)
    assert lost == [first] and first.lost() and not third.lost()
    first.release()  # the loser must not delete the winner's claim
    assert read_json(path)["token"] == third.info["token"]
    third.release()
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_two_workers_run_each_point_once_and_match_one_worker(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])  # for the worker processes
    for name in ("one", "two"):  # the same relative --out: the same teacher paths in every config.yaml
        _write(tmp_path / name / "sweep.yaml", SMALL)
    monkeypatch.chdir(tmp_path / "one")
    assert main(["sweep", "sweep.yaml", "--out", "out", "--quiet", "--threads-per-worker", "1"]) == 0
    monkeypatch.chdir(tmp_path / "two")
    capsys.readouterr()
    assert main(["sweep", "sweep.yaml", "--out", "out", "--quiet", "--workers", "2", "--threads-per-worker", "1"]) == 0
    assert len(re.findall(r"\[\d/4\] done ", capsys.readouterr().out)) == 4  # one line per finished run
    one, two = (read_json(tmp_path / d / "out" / "sweep.json") for d in ("one", "two"))
    session = two["invocations"][0]
    assert len(two["invocations"]) == 1 and len(session["workers"]) == 2
    assert session["ran"] == sum(w["ran"] for w in session["workers"]) == 4 and session["failed"] == 0
    assert two["plan"] == one["plan"] and two["runs"].keys() == one["runs"].keys()
    same = ("state", "error", "group", "teacher", "config", "digest", "top1")
    teacher = weights_digest(Path("out/teachers/t28"))
    for name, entry in two["runs"].items():
        assert entry["attempts"] == 1, name
        assert entry.get("teacher_weights") == (teacher if entry["group"] == "distill" else None)
        assert {k: entry.get(k) for k in same} == {k: one["runs"][name].get(k) for k in same}
        a, b = RunDir(tmp_path / "one" / "out" / name), RunDir(tmp_path / "two" / "out" / name)
        assert a.config_file.read_text() == b.config_file.read_text()
        for key in ("top1", "ece", "nll", "config_digest"):
            assert a.metrics()[key] == b.metrics()[key], (name, key)
    assert not list(SweepDir("out").claims.rglob("*.json")) and not list(SweepDir("out").workers.glob("*"))
    assert main(["sweep", "--status", "out"]) == 0
    assert "4 runs: 4 finished" in capsys.readouterr().out


def test_a_killed_worker_is_taken_over_and_its_run_resumed(tmp_path, capsys):
    cfg = _write(tmp_path / "sweep.yaml", {"base": {**TINY, "epochs": 2},
                                           "supervised": {"model": "cnn-small", "size": 7, "seed": [0, 1]}})
    out = tmp_path / "out"
    first, second = (f"supervised/model=cnn-small,size=7,seed={s}" for s in (0, 1))
    env = {**cli_env(), "CQKD_TEST_KILL_AFTER_EPOCH": "1", "OMP_NUM_THREADS": "1"}  # kill -9 after epoch 1
    doomed = subprocess.Popen(cqkd_cmd("sweep", str(cfg), "--out", str(out), "--stale-after", "5", "--quiet"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not _running(out, first) and doomed.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert _running(out, first), doomed.communicate()[0]
        assert main(["sweep", "--status", str(out), "--stale-after", "5"]) == 0  # who runs what
        status = capsys.readouterr().out
        assert "2 runs: 1 running, 1 pending" in status and f":{doomed.pid}" in status
        result = run_sweep(load_sweep(cfg, out), progress=False, print_fn=lambda s: None, stale_after=5)
        assert doomed.wait(timeout=120) == -signal.SIGKILL
    finally:
        if doomed.poll() is None:
            doomed.kill()
    assert result.ok and sorted(result.ran) == [first, second]
    entry = read_json(out / "sweep.json")["runs"][first]
    assert entry["state"] == "finished" and entry["attempts"] == 2
    assert entry["takeovers"][0]["from"].endswith(f":{doomed.pid}")
    assert entry["takeovers"][0]["heartbeat_age_s"] >= 5
    assert RunDir(out / first).metrics()["resumed_from"]  # continued from the killed worker's checkpoint
    assert not list(SweepDir(out).claims.rglob("*.json"))


def test_failures_are_recorded_once_and_the_other_worker_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    cfg = _write(tmp_path / "fail.yaml", {
        "base": TINY, "teachers": {"bad": {"model": "no-such-net"}},
        "supervised": {"model": "cnn-small", "size": [64, 7]},  # 64 px: larger than the 28 px images
        "distill": {"teacher": "bad", "model": "cnn-small", "size": 7, "temperature": [1, 2]}})
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--workers", "2", "--threads-per-worker", "1"]) == 1
    state = read_json(out / "sweep.json")
    runs = state["runs"]
    assert runs["teachers/bad"]["state"] == "failed" and runs["teachers/bad"]["attempts"] == 1
    big = runs["supervised/model=cnn-small,size=64,seed=0"]
    assert big["state"] == "failed" and big["attempts"] == 1 and "larger than" in big["error"]
    assert runs["supervised/model=cnn-small,size=7,seed=0"]["state"] == "finished"
    students = [n for n in runs if n.startswith("distill/")]
    for name in students:  # never started
        assert runs[name]["state"] == "failed" and "teacher 'bad' failed" in runs[name]["error"]
        assert "attempts" not in runs[name] and not (out / name).exists()
    session = state["invocations"][0]
    assert len(students) == 2 and session["failed"] == 4 and session["ran"] == 1


def test_ray_launcher_completes_a_tiny_sweep(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cqkd[ray]')")
    monkeypatch.setenv("PYTHONPATH", cli_env()["PYTHONPATH"])
    cfg = _write(tmp_path / "sweep.yaml", {**SMALL, "supervised": None})
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out), "--quiet", "--launcher", "ray", "--workers", "2",
                 "--threads-per-worker", "1"]) == 0
    state = read_json(out / "sweep.json")
    assert {e["state"] for e in state["runs"].values()} == {"finished"} and len(state["runs"]) == 3
    assert all(e["attempts"] == 1 for e in state["runs"].values())
    assert len(state["invocations"][0]["workers"]) == 2  # both Ray tasks worked on the sweep
    assert len(list(SweepDir(out).logs.glob("*-ray-*.log"))) == 2
