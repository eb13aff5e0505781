"""Many workers on one sweep directory: claims, take-over of a killed worker."""

from __future__ import annotations

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
from cqkd.study.claims import Heartbeat, identity, take
from cqkd.study.plan import load_sweep
from cqkd.study.runner import run_sweep
from cqkd.study.state import SweepDir

TINY = {"dataset": "synthetic", "train_samples": 200, "epochs": 1, "accelerator": "cpu"}


def _write(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


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


def test_a_killed_worker_is_taken_over_and_its_run_resumed(tmp_path, capsys):
    cfg = _write(tmp_path / "sweep.yaml", {"base": {**TINY, "epochs": 2},
                                           "supervised": {"model": "cnn-small", "size": 7, "seed": [0, 1]}})
    out = tmp_path / "out"
    first, second = (f"supervised/model=cnn-small,size=7,seed={s}" for s in (0, 1))
    env = {**cli_env(), "CQKD_TEST_KILL_AFTER_EPOCH": "1", "OMP_NUM_THREADS": "1"}  # kill -9 after epoch 1
    doomed = subprocess.Popen(cqkd_cmd("sweep", str(cfg), "--out", str(out), "--stale-after", "5", "--quiet"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        claim = SweepDir(out).claim_file(first)
        deadline = time.time() + 300
        while not claim.exists() and doomed.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert claim.exists(), doomed.communicate()[0]
        assert main(["sweep", "--status", str(out), "--stale-after", "5"]) == 0  # who runs what
        status = capsys.readouterr().out
        assert "1 running" in status and f":{doomed.pid}" in status and first in status
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
