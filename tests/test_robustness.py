"""Issue 7: bad input gets one clear line (exit 2), interruptions lose nothing, saved files are
safe to load; and issue 6's ``--resume``.

Bad inputs go through ``cqkd.cli.main`` in-process (the same code path as the command, without
paying the import time once per case); runs that are killed go through real subprocesses
(``python -m cqkd``) with test-only hooks that make the kill deterministic:
``CQKD_TEST_HANG_AT_STEP`` (wait at a step, after its periodic checkpoint, until a signal) and
``CQKD_TEST_KILL_AFTER_EPOCH`` (SIGKILL once an epoch and its checkpoints are complete).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cqkd.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--dataset", "synthetic", "--train-samples", "300", "--size", "7", "--epochs", "1", "--quiet"]
KILLABLE = ["--dataset", "synthetic", "--train-samples", "400", "--size", "7", "--epochs", "2",
            "--batch-size", "64", "--checkpoint-every-n-steps", "2", "--quiet"]


def cqkd(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def spawn(*argv: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen([sys.executable, "-m", "cqkd", *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Poll until the checkpoint ``path`` exists and holds ``global_step == step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc={proc.returncode}) before step {step}:\n{err[-2000:]}")
        if path.exists():
            try:
                if torch.load(path, map_location="cpu", weights_only=True)["global_step"] == step:
                    return
            except Exception:
                pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{path} did not reach step {step} within {timeout}s")


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def assert_no_finished_run(path: Path) -> None:
    assert not (path / "metrics.json").exists()
    if (path / "status.json").exists():
        assert status(path)["state"] != "finished"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny finished teacher run at 14 px (so that a 20 px student is 'larger than the teacher')."""
    out = tmp_path_factory.mktemp("teacher") / "t14"
    assert main(["train", *FAST, "--size", "14", "--out", str(out)]) == 0
    return out


class Malicious:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Malicious(marker)}, f)
    # torch.save also pickles: a legitimate-looking zip checkpoint with the same payload
    torch.save({"state_dict": {}, "payload": Malicious(marker)}, str(path) + ".zip")


# ------------------------------------------------------------------------------ bad input: exit 2, one line

@pytest.mark.parametrize("extra, culprit", [
    (["--size", "0"], "size=0"),
    (["--size", "40"], "--size 40 is larger than the synthetic images"),
    (["--model", "cnn-smal"], "did you mean 'cnn-small'"),
    (["--dataset", "syntetic"], "did you mean 'synthetic'"),
    (["--epochs", "0"], "epochs=0"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--checkpoint-every-n-steps", "-1"], "checkpoint_every_n_steps=-1"),
    (["--data-dir", "/nonexistent/cqkd"], "--data-dir '/nonexistent/cqkd' does not exist"),
])
def test_bad_train_option(capsys, tmp_path, extra, culprit):
    out = tmp_path / "run"
    code, err = cqkd(capsys, "train", *FAST, *extra, "--out", out)
    assert code == 2
    assert err.startswith("cqkd: error: ") and err.count("\n") == 1, err
    assert culprit in err
    assert not out.exists()  # detected before a run directory is created


@pytest.mark.parametrize("extra, culprit", [
    (["--temperature", "0"], "temperature=0.0: must be > 0"),
    (["--temperature", "-2"], "temperature=-2.0: must be > 0"),
    (["--temperature", "hot"], "temperature='hot'"),
    (["--alpha", "1.5"], "alpha=1.5: must be in [0, 1]"),
    (["--alpha", "-0.1"], "alpha=-0.1"),
    (["--size", "20"], "--size 20 is larger than the teacher's input (14 px)"),
])
def test_bad_distill_option(capsys, tmp_path, teacher, extra, culprit):
    out = tmp_path / "run"
    code, err = cqkd(capsys, "distill", *FAST, "--size", "7", "--teacher", teacher, *extra, "--out", out)
    assert code == 2 and err.count("\n") == 1, err
    assert culprit in err
    assert not out.exists()


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_teachers(capsys, tmp_path, teacher):
    from safetensors.torch import save_file

    from cqkd.nets.registry import build_model

    cases = []
    missing = tmp_path / "missing"
    cases.append((missing, "is not a directory"))
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    cases.append((not_a_run, "is not a cqkd run directory (no config.yaml)"))
    no_weights = _copy_run(teacher, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    cases.append((no_weights, "has no trained model (model.safetensors missing)"))
    truncated = _copy_run(teacher, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 3])
    cases.append((truncated, "is corrupt or not a safetensors file"))
    five = _copy_run(teacher, tmp_path / "five-classes")
    model = build_model("cnn-small", 5, 1, 14)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(five / "model.safetensors"))
    cases.append((five, "predicts 5 classes but dataset 'synthetic' has 10"))
    for path, culprit in cases:
        out = tmp_path / f"student-{path.name}"
        code, err = cqkd(capsys, "distill", *FAST, "--teacher", path, "--out", out)
        assert code == 2 and err.count("\n") == 1, (path, err)
        assert culprit in err, (path, err)
        assert not out.exists()


@pytest.mark.parametrize("yaml_text, culprit", [
    ("bogus_key: 1\n", "c.yaml': unknown key 'bogus_key' (value 1)"),
    ("epoch: 3\n", "unknown key 'epoch' (value 3) (did you mean 'epochs'?)"),
    ("epochs: many\n", "c.yaml': epochs='many' has the wrong type (expected int)"),
    ("epochs: 1.5\n", "epochs=1.5 has the wrong type"),
    ("alpha: 2\n", "alpha=2.0: must be in [0, 1]"),
    ("batch_size: 0\n", "batch_size=0: must be at least 1"),
    ("- a list\n", "must hold a mapping of options"),
    ("epochs: [\n", "is not valid YAML"),
])
def test_bad_config_yaml(capsys, tmp_path, yaml_text, culprit):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    out = tmp_path / "run"
    args = [a for a in FAST if a not in ("--epochs", "1")]
    code, err = cqkd(capsys, "train", *args, "--config", config, "--out", out)
    assert code == 2 and culprit in err, err
    assert not out.exists()


def test_finished_run_needs_force(capsys, teacher):
    before = (teacher / "metrics.json").read_text()
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", teacher)
    assert code == 2 and "holds a finished run; pass --force" in err
    assert (teacher / "metrics.json").read_text() == before and status(teacher)["state"] == "finished"


def test_bad_input_through_the_real_command(tmp_path):
    out = tmp_path / "run"
    proc = spawn("train", *FAST, "--lr", "0", "--out", out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines() == ["cqkd: error: options: lr=0.0: must be > 0"]
    assert not out.exists()


def test_nan_loss_marks_the_run_failed(capsys, tmp_path):
    out = tmp_path / "nan"
    code, err = cqkd(capsys, "train", "--dataset", "synthetic", "--train-samples", "400", "--size", "7",
                     "--epochs", "1", "--batch-size", "32", "--lr", "1e6", "--quiet", "--out", out)
    assert code == 1
    assert err.count("\n") == 1 and "training diverged: the loss became nan at step" in err, err
    assert status(out)["state"] == "failed" and "diverged" in status(out)["error"]
    assert_no_finished_run(out)


# ------------------------------------------------------------------------------ interruptions and --resume

def test_sigkill_mid_epoch_then_resume(capsys, tmp_path):
    out = tmp_path / "killed"
    proc = spawn("train", *KILLABLE, "--out", out, CQKD_TEST_HANG_AT_STEP="4")
    wait_for_step(out / "checkpoints" / "step.ckpt", 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert status(out)["state"] == "running"  # nobody could say otherwise...
    from cqkd.analysis.runs import list_runs
    from cqkd.core.rundir import RunDir, effective_state

    state, note = effective_state(RunDir(out))
    assert state == "failed" and "stale" in note  # ...but its process is gone
    assert [r["state"] for r in list_runs(tmp_path)] == ["failed"]
    # the periodic checkpoint is intact and safe to load
    ckpt = torch.load(out / "checkpoints" / "step.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and "optimizer_states" in ckpt and ckpt["cqkd"]["config_digest"]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    # without --resume (and without --force) the checkpoints are not thrown away
    code, err = cqkd(capsys, "train", *KILLABLE, "--out", out)
    assert code == 2 and "pass --resume to continue it or --force" in err
    code, err = cqkd(capsys, "train", "--out", out, "--resume", "--quiet")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == "step.ckpt" and 0 <= metrics["top1"] <= 1
    assert status(out)["state"] == "finished"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize("sig, name, rc", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_sigterm_or_ctrl_c_saves_a_clean_checkpoint_then_resume(capsys, tmp_path, sig, name, rc):
    out = tmp_path / "terminated"
    proc = spawn("train", *KILLABLE, "--out", out, CQKD_TEST_HANG_AT_STEP="2")
    wait_for_step(out / "checkpoints" / "step.ckpt", 2, proc)  # it now waits at step 2 for a signal
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"cqkd: interrupted by {name} at step 2; checkpoint saved to "), err
    assert "--resume" in last_line
    st = status(out)
    assert st["state"] == "failed" and st["error"] == "interrupted" and st["signal"] == name and st["step"] == 2
    ckpt = torch.load(out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and "optimizer_states" in ckpt and "lr_schedulers" in ckpt
    code, err = cqkd(capsys, "train", "--out", out, "--resume", "--quiet")
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == "interrupted.ckpt"


def test_resume_reproduces_an_uninterrupted_run(capsys, tmp_path):
    args = [*KILLABLE, "--checkpoint-every-n-steps", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = spawn("train", *args, "--out", cut, CQKD_TEST_KILL_AFTER_EPOCH="1")
    assert cqkd(capsys, "train", *args, "--out", whole)[0] == 0  # meanwhile, the uninterrupted run
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert (cut / "checkpoints" / "last.ckpt").exists() and not (cut / "metrics.json").exists()
    code, err = cqkd(capsys, "train", *args, "--out", cut, "--resume")
    assert code == 0, err
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert b["resumed_from"] == "last.ckpt"
    for key, value in a.items():
        if key in ("time_s",):
            continue
        if isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        else:
            assert b[key] == value, key
    la = torch.load(whole / "test_logits.pt", weights_only=True)["logits"]
    lb = torch.load(cut / "test_logits.pt", weights_only=True)["logits"]
    torch.testing.assert_close(la, lb)
    # the training curves of the first epoch survive the resume
    assert (cut / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()


def test_resume_refusals(capsys, tmp_path, teacher):
    code, err = cqkd(capsys, "train", *FAST, "--out", tmp_path / "nothing", "--resume")
    assert code == 2 and "holds no run to resume" in err
    code, err = cqkd(capsys, "train", "--out", teacher, "--resume")
    assert code == 2 and "already finished; nothing to resume" in err
    code, err = cqkd(capsys, "train", "--out", teacher, "--resume", "--force")
    assert code == 2 and "contradict" in err
    # an unfinished run asked to continue with other settings
    run = tmp_path / "stopped"
    run.mkdir()
    cfg = yaml_config(teacher)
    (run / "config.yaml").write_text((teacher / "config.yaml").read_text())
    (run / "status.json").write_text(json.dumps({"state": "failed", "error": "interrupted"}))
    code, err = cqkd(capsys, "train", "--out", run, "--resume", "--epochs", "3", "--lr", "0.01")
    assert code == 2 and "differs from the one stored" in err
    assert f"epochs={cfg['epochs']!r} stored, 3 requested" in err and "lr=0.001 stored, 0.01 requested" in err
    assert status(run)["state"] == "failed"
    # a checkpoint written by another cqkd version, or for another config, is refused
    ckpt = torch.load(teacher / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (run / "checkpoints").mkdir()
    ckpt["cqkd"] = {**ckpt["cqkd"], "version": "0.0.1"}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    code, err = cqkd(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 2 and "written by cqkd 0.0.1" in err
    ckpt["cqkd"] = {**ckpt["cqkd"], "version": __import__("cqkd").__version__, "config_digest": "0" * 16}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    code, err = cqkd(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 2 and "belongs to another configuration" in err
    assert_no_finished_run(run)


def yaml_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


# ------------------------------------------------------------------------------ safe persistence

def test_malicious_checkpoint_is_refused_not_executed(capsys, tmp_path, teacher):
    marker = tmp_path / "pwned"
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "config.yaml").write_text((teacher / "config.yaml").read_text())
    (run / "status.json").write_text(json.dumps({"state": "failed", "error": "interrupted"}))
    plant(run / "checkpoints" / "last.ckpt", marker)
    code, err = cqkd(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 2 and "refusing to load it" in err and "last.ckpt" in err, err
    (run / "checkpoints" / "last.ckpt.zip").replace(run / "checkpoints" / "last.ckpt")
    code, err = cqkd(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 2 and "refusing to load it" in err, err
    assert not marker.exists()
    # Lightning's own loading path (ckpt_path="best", resume) goes through the same loader
    from cqkd.errors import CqkdError
    from cqkd.train.checkpoints import AtomicCheckpointIO

    with pytest.raises(CqkdError):
        AtomicCheckpointIO().load_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=False)
    # a pickle in place of the teacher's weights or of the saved test logits
    fake = _copy_run(teacher, tmp_path / "fake-teacher")
    plant(fake / "model.safetensors", marker)
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", fake, "--out", tmp_path / "student")
    assert code == 2 and "not a safetensors file" in err
    plant(fake / "test_logits.pt", marker)
    from cqkd.core.rundir import RunDir

    with pytest.raises(CqkdError, match="corrupt or not a tensor file"):
        RunDir(fake).test_logits()
    (fake / "test_logits.pt.zip").replace(fake / "test_logits.pt")
    with pytest.raises(CqkdError):
        RunDir(fake).test_logits()
    assert not marker.exists()


def test_evaluate_refuses_weights_of_another_config(capsys, tmp_path, teacher):
    run = _copy_run(teacher, tmp_path / "edited")
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("seed: 0", "seed: 5"))
    code, err = cqkd(capsys, "evaluate", run, "--quiet")
    assert code == 2 and "trained with another configuration" in err


def test_checkpoints_and_outputs_are_atomic(tmp_path, teacher):
    from cqkd.core.io import atomic_write

    target = tmp_path / "file.txt"
    target.write_text("old")

    def fail_midway(f):
        f.write("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail_midway)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    # no temporary files are left behind by a whole run, and every checkpoint loads safely
    leftovers = [p for p in teacher.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for ckpt in (teacher / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["cqkd"]["version"]


def test_runs_list(capsys, tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    root = tmp_path / "runs"
    _copy_run(teacher, root / "teacher")
    stale = root / "stale"
    stale.mkdir()
    (stale / "config.yaml").write_text((teacher / "config.yaml").read_text())
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (stale / "status.json").write_text(json.dumps({"state": "running", "pid": int(proc.stdout)}))
    code = main(["runs", "list", str(root)])
    out = capsys.readouterr().out
    assert code == 0
    assert "teacher" in out and "finished" in out and "stale" in out and "failed" in out
    assert "cnn-small" in out


def test_distill_resume_refuses_a_changed_teacher(capsys, tmp_path, teacher):
    from safetensors.torch import load_file, save_file

    own_teacher = _copy_run(teacher, tmp_path / "teacher")
    out = tmp_path / "student"
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", own_teacher, "--out", out)
    assert code == 0, err
    # make it look interrupted after its last epoch-end checkpoint
    (out / "metrics.json").unlink()
    (out / "status.json").write_text(json.dumps({"state": "failed", "error": "interrupted"}))
    state = load_file(str(own_teacher / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()},
              str(own_teacher / "model.safetensors"))
    code, err = cqkd(capsys, "distill", "--out", out, "--resume", "--quiet")  # teacher from config.yaml
    assert code == 2 and "the teacher in" in err and "changed since" in err, err
    assert_no_finished_run(out)


def test_unreadable_data_dir(capsys, tmp_path, monkeypatch):
    """(Tests run as root here, where chmod 000 does not stop reading: simulate the denial.)"""
    data = tmp_path / "data"
    data.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(data) else real_access(p, mode))
    out = tmp_path / "run"
    code, err = cqkd(capsys, "train", *FAST, "--data-dir", data, "--out", out)
    assert code == 2 and f"--data-dir '{data}' is not readable (permission denied)" in err
    assert not out.exists()


# ============================================================================== issue 12: nothing lost, ever

import queue  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402


def one_line(code: int, err: str) -> bool:
    """Exit 2 and exactly one line on stderr, in cqkd's form."""
    return code == 2 and err.startswith("cqkd: error: ") and err.count("\n") == 1


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks as their target text) and its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


class Lines:
    """The stderr lines of a subprocess, read by a thread (so waiting for one never blocks)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.queue, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the process ended (rc={self.proc.wait()}) before {text!r}:\n{''.join(self.seen)[-3000:]}")
            self.seen.append(line)
            if text in line:
                return
        self.proc.kill()
        pytest.fail(f"no {text!r} within {timeout}s:\n{''.join(self.seen)[-3000:]}")

    def rest(self, timeout: float = 60.0) -> str:
        """Wait for the process to end; all of its stderr."""
        self.proc.wait(timeout=timeout)
        while (line := self.queue.get(timeout=10)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def spawn_in(phase: str, *argv: str) -> tuple[subprocess.Popen, Lines]:
    """Start ``cqkd *argv`` and return once it waits in ``phase`` (test hook CQKD_TEST_HANG_IN)."""
    proc = spawn(*argv, CQKD_TEST_HANG_IN=phase)
    lines = Lines(proc)
    lines.wait_for(f"cqkd-test: waiting in {phase}")
    return proc, lines


# ---------------------------------------------------------------- 1. cqkd deletes or overwrites only its own files

def test_force_or_resume_never_write_into_a_directory_that_is_not_a_run(capsys, tmp_path):
    p = tmp_path / "p"
    (p / "checkpoints").mkdir(parents=True)
    (p / "checkpoints" / "epoch=3-step=999.ckpt").write_text("x")
    (p / "train.py").write_text("x")
    before = snapshot(p)
    for extra in ([], ["--force"], ["--resume"]):
        code, err = cqkd(capsys, "train", *FAST, "--out", p, *extra)
        assert one_line(code, err) and ("is not a cqkd run" in err or "holds no run to resume" in err), (extra, err)
    assert snapshot(p) == before


def test_resume_never_takes_a_config_yaml_for_a_run(capsys, tmp_path, teacher):
    p = tmp_path / "mine"
    p.mkdir()
    (p / "config.yaml").write_text((teacher / "config.yaml").read_text())
    (p / "metrics.csv").write_text("my,own\n1,2\n")
    (p / "model.safetensors").write_text("my own weights")
    before = snapshot(p)
    code, err = cqkd(capsys, "train", "--out", p, "--resume", "--quiet")
    assert one_line(code, err) and "holds no run to resume" in err, err
    assert snapshot(p) == before


def test_force_replaces_only_the_files_the_run_wrote(capsys, tmp_path, teacher):
    run = _copy_run(teacher, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "epoch=3-step=999.ckpt").write_text("mine too")
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", run, "--force")
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "epoch=3-step=999.ckpt").read_text() == "mine too"
    assert status(run)["state"] == "finished"
    marker = json.loads((run / ".cqkd-run.json").read_text())
    assert "notes.txt" not in marker["files"] and "model.safetensors" in marker["files"]


def test_an_unowned_file_under_a_run_file_name_is_not_overwritten(capsys, tmp_path, teacher):
    run = _copy_run(teacher, tmp_path / "run")
    marker = json.loads((run / ".cqkd-run.json").read_text())
    marker["files"].remove("calibration.json")
    (run / ".cqkd-run.json").write_text(json.dumps(marker))
    (run / "calibration.json").write_text('{"mine": true}')
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", run, "--force")
    assert one_line(code, err) and "calibration.json" in err and "not written by cqkd" in err, err
    code, err = cqkd(capsys, "calibrate", run, "--quiet")
    assert one_line(code, err) and "not written by cqkd" in err, err
    assert (run / "calibration.json").read_text() == '{"mine": true}'


def test_deleting_never_follows_a_symlink_out_of_the_run(capsys, tmp_path, teacher):
    run = _copy_run(teacher, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("best.ckpt", "last.ckpt", "step.ckpt"):
        (outside / name).write_text("precious")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(outside)
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", run, "--force")
    assert one_line(code, err) and "symbolic link" in err, err
    assert sorted(p.name for p in outside.iterdir()) == ["best.ckpt", "last.ckpt", "step.ckpt"]
    from cqkd.core.rundir import RunDir

    RunDir(run).remove_owned()  # even when asked directly, nothing beyond the link is touched
    assert sorted(p.name for p in outside.iterdir()) == ["best.ckpt", "last.ckpt", "step.ckpt"]


def test_a_run_written_before_the_marker_is_still_a_run(capsys, tmp_path, teacher):
    """The long experiments' runs have config.yaml and status.json but no marker."""
    run = _copy_run(teacher, tmp_path / "old")
    (run / ".cqkd-run.json").unlink()
    (run / "notes.txt").write_text("mine")
    code, err = cqkd(capsys, "evaluate", run, "--quiet")
    assert code == 0, err
    assert [r["state"] for r in __import__("cqkd.analysis.runs", fromlist=["list_runs"]).list_runs(run)] == ["finished"]
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", run, "--force")
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / ".cqkd-run.json").exists()


# ---------------------------------------------------------------- 2. a student never writes into its teacher

def test_a_student_never_writes_into_its_teacher(capsys, tmp_path, teacher):
    own = _copy_run(teacher, tmp_path / "teacher")
    before = snapshot(own)
    for out in (own, own / "student", tmp_path):
        code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, "--out", out, "--force")
        assert one_line(code, err) and "teacher" in err, (out, err)
    assert snapshot(own) == before


# ---------------------------------------------------------------- 3. one writer per run

def test_one_process_per_run_directory(capsys, tmp_path):
    out = tmp_path / "busy"
    proc = spawn("train", *KILLABLE, "--out", out, CQKD_TEST_HANG_AT_STEP="2")
    try:
        wait_for_step(out / "checkpoints" / "step.ckpt", 2, proc)
        # what a second process sees in the window before the first one has written "running"
        (out / "status.json").write_text(json.dumps({"state": "failed", "error": "interrupted"}))
        code, err = cqkd(capsys, "train", *KILLABLE, "--out", out, "--force")
        assert one_line(code, err), err
        assert f"pid {proc.pid}" in err and socket.gethostname() in err
        assert (out / "checkpoints" / "step.ckpt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 143


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    from cqkd.core.lock import acquire
    from cqkd.errors import CqkdError

    path = tmp_path / "x.lock"
    code = f"from cqkd.core.lock import acquire; import time; acquire({str(path)!r}, 'x'); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CqkdError, match=f"pid {holder.pid} on {socket.gethostname()}"):
            acquire(path, "x")
    finally:
        holder.kill()
        holder.wait()
    with acquire(path, "x"):  # the kernel released it with the process
        with acquire(path, "x"):  # re-entrant within one process
            pass


# ---------------------------------------------------------------- 4. signals in every phase

@pytest.mark.parametrize("sig, name, rc", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)])
def test_a_signal_stops_the_teacher_cache_build(tmp_path, teacher, sig, name, rc):
    own = _copy_run(teacher, tmp_path / "teacher")
    out = tmp_path / "student"
    proc, lines = spawn_in("cache", "distill", *FAST, "--teacher", own, "--out", out)
    assert list((own / "cache").glob(".build-*"))  # the build is under way (its finished chunks are kept)
    t0 = time.monotonic()
    proc.send_signal(sig)
    err = lines.rest(timeout=30)
    assert proc.returncode == rc and time.monotonic() - t0 < 15, err
    assert f"interrupted by {name}" in err.strip().splitlines()[-1]
    st = status(out)
    assert st["state"] == "failed" and st["error"] == "interrupted" and st["signal"] == name
    assert not list((own / "cache").glob(".tmp-*"))  # no half-written cache, and no cache at all:
    assert not [d for d in (own / "cache").iterdir() if d.is_dir() and not d.name.startswith(".")]


def test_a_killed_cache_build_is_cleaned_on_the_next_start(capsys, tmp_path, teacher):
    own = _copy_run(teacher, tmp_path / "teacher")
    proc, _ = spawn_in("cache", "distill", *FAST, "--teacher", own, "--out", tmp_path / "killed")
    proc.kill()
    proc.wait()
    assert list((own / "cache").glob(".build-*"))
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, "--out", tmp_path / "next")
    assert code == 0, err
    assert not list((own / "cache").glob(".tmp-*")) and not list((own / "cache").glob(".build-*"))
    assert json.loads((tmp_path / "next" / "metrics.json").read_text())["teacher_source"] == "cache"


@pytest.mark.parametrize("phase", ["data", "test", "calibration", "report"])
def test_sigterm_in_every_phase(tmp_path, teacher, phase):
    out = tmp_path / "run"
    if phase in ("data", "test"):
        argv = ["train", *FAST, "--out", out]
    elif phase == "calibration":
        out = _copy_run(teacher, tmp_path / "teacher")
        argv = ["calibrate", out, "--quiet"]
    else:
        _copy_run(teacher, out / "teacher")
        argv = ["report", out]
    proc, lines = spawn_in(phase, *argv)
    proc.send_signal(signal.SIGTERM)
    err = lines.rest(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("cqkd: interrupted by SIGTERM"), err
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    if phase == "data":
        assert not out.exists()  # stopped before a run directory was created
    elif phase == "test":
        assert status(out)["state"] == "failed" and status(out)["error"] == "interrupted"
        assert not (out / "metrics.json").exists()
    elif phase == "calibration":
        assert not (out / "calibration.json").exists()
    else:
        assert not (out / "report.md").exists()


def test_distributed_settings_that_cannot_start_fail_fast(tmp_path):
    out = tmp_path / "run"
    proc = spawn("train", *FAST, "--accelerator", "cpu", "--num-nodes", "2", "--out", out)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("--num-nodes 2 on one host hangs")
    assert one_line(proc.returncode, err) and "--num-nodes 2" in err, err
    assert not out.exists()


# ---------------------------------------------------------------- 5. and 6. user mistakes: one line, exit 2, before any run directory

@pytest.mark.parametrize("extra, culprit", [
    (["--seed", "-1"], "seed=-1"),
    (["--seed", "99999999999999999999"], "seed=99999999999999999999"),
    (["--weight-decay", "nan"], "weight_decay=nan"),
    (["--weight-decay", "inf"], "weight_decay=inf"),
    (["--lr", "inf"], "lr=inf"),
    (["--lr", "nan"], "lr=nan"),
    (["--label-smoothing", "nan"], "label_smoothing=nan"),
    (["--accelerator", "tpu"], "--accelerator"),
    (["--accelerator", "bogus"], "--accelerator"),
    (["--strategy", "bogus"], "--strategy"),
    (["--devices", "bogus"], "--devices"),
    (["--devices", "0"], "--devices"),
    (["--train-samples", "100000"], "--train-samples 100000 is more than the 4000 images"),
])
def test_more_bad_train_options(capsys, tmp_path, extra, culprit):
    out = tmp_path / "run"
    code, err = cqkd(capsys, "train", *FAST, *extra, "--out", out)
    assert one_line(code, err) and culprit in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu(capsys, tmp_path):
    out = tmp_path / "run"
    code, err = cqkd(capsys, "train", *FAST, "--accelerator", "gpu", "--out", out)
    assert one_line(code, err) and "--accelerator" in err, err
    assert not out.exists()


def test_infinite_temperature(capsys, tmp_path, teacher):
    out = tmp_path / "run"
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", teacher, "--temperature", "inf", "--out", out)
    assert one_line(code, err) and "temperature=inf" in err, err
    assert not out.exists()


def test_out_under_a_file_or_in_a_read_only_directory(capsys, tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = cqkd(capsys, "train", *FAST, "--out", f / "run")
    assert one_line(code, err) and "is not a directory" in err, err
    assert f.read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access  # (tests run as root, where chmod does not stop writing: simulate it)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    code, err = cqkd(capsys, "train", *FAST, "--out", ro / "run")
    assert one_line(code, err) and "not writable" in err, err
    assert not (ro / "run").exists()


@pytest.mark.parametrize("content, culprit", [
    (b"\x00\x01\x02\xff\xfe binary", "not a text file"),
    (b"\xff\xfeepochs: 1\n", "not a text file"),
    (b"epochs: 1\nepochs: 2\n", "duplicate key 'epochs'"),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     b"f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n", "alias"),
    (b"a: &a [*a]\n", "alias"),
    (b"epochs: [\n", "is not valid YAML"),
    (b"[" * 5000, "is not valid YAML"),
])
def test_bad_yaml_files(capsys, tmp_path, content, culprit):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    out = tmp_path / "run"
    code, err = cqkd(capsys, "train", *FAST, "--config", config, "--out", out)
    assert one_line(code, err) and culprit in err and "c.yaml" in err, err
    assert not out.exists()


@pytest.mark.parametrize("content", ["[1, 2]", '"running"', '{"state": 5}', '{"state": "running", "pid": "x"}',
                                     "\x00\x01", '{"state": "finished", "state": "failed"}'])
def test_a_status_json_of_the_wrong_shape(capsys, tmp_path, teacher, content, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    run = _copy_run(teacher, tmp_path / "run")
    (run / "status.json").write_text(content)
    code, err = cqkd(capsys, "train", *FAST, "--size", "14", "--out", run)
    assert one_line(code, err), err
    assert main(["runs", "list", str(tmp_path)]) == 0
    assert "status.json" in capsys.readouterr().out


@pytest.mark.parametrize("content", ['{"plan": 5}', '{"plan": [{"name": 1}]}', '{"runs": {"a": 3}}', "[]",
                                     '{"plan": [{"name": "x", "group": "teachers"}], "runs": {"x": {"config": [1]}}}'])
def test_a_sweep_json_of_the_wrong_shape(capsys, tmp_path, content):
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text(content)
    code, err = cqkd(capsys, "report", d)
    assert one_line(code, err) and "sweep.json" in err, err
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {dataset: synthetic, epochs: 1}\nsupervised: {size: 7}\n")
    code, err = cqkd(capsys, "sweep", spec, "--out", d, "--dry-run")
    assert one_line(code, err) and "sweep.json" in err, err


class _FullDisk:
    """A file whose writes fail with ENOSPC (what a full disk does)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def fill_disk(monkeypatch, name: str) -> None:
    """Make every write of a file called ``name`` (through os.fdopen, as atomic_write opens it) fail."""
    import cqkd.core.io as io_module

    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        return _FullDisk(f) if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}.") else f

    monkeypatch.setattr(io_module.os, "fdopen", fdopen)


def test_a_full_disk(capsys, tmp_path, teacher, monkeypatch):
    run = _copy_run(teacher, tmp_path / "run")
    (run / "calibration.json").write_text('{"t_cal": 1.5, "method": "temperature"}')
    fill_disk(monkeypatch, "calibration.json")
    code, err = cqkd(capsys, "calibrate", run, "--quiet")
    assert one_line(code, err) and "calibration.json" in err and "No space left on device" in err, err
    assert (run / "calibration.json").read_text() == '{"t_cal": 1.5, "method": "temperature"}'
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    # a run that cannot write its weights: marked failed, one line, the files it had intact
    fill_disk(monkeypatch, "model.safetensors")
    out = tmp_path / "student"
    code, err = cqkd(capsys, "train", *FAST, "--out", out)
    assert one_line(code, err) and "model.safetensors" in err and "No space left on device" in err, err
    assert status(out)["state"] == "failed" and not (out / "model.safetensors").exists()
    # torch.save's writer reports a failed write as a RuntimeError: still one line naming the file
    fill_disk(monkeypatch, "last.ckpt")
    code, err = cqkd(capsys, "train", *FAST, "--out", tmp_path / "third")
    assert one_line(code, err) and "last.ckpt" in err, err


def test_plot_and_models_mistakes(capsys, tmp_path, teacher):
    (tmp_path / "fig.png").mkdir()
    code, err = cqkd(capsys, "plot", "reliability", teacher, "--out", tmp_path / "fig.png")
    assert one_line(code, err) and "is a directory" in err, err
    code, err = cqkd(capsys, "plot", "reliability", teacher, "--out", tmp_path)
    assert one_line(code, err), err
    for extra in (["--channels", "0"], ["--size", "0"], ["--classes", "0"], ["--size", "100000"]):
        code, err = cqkd(capsys, "models", *extra)
        assert one_line(code, err), (extra, err)
    code, err = cqkd(capsys, "train", *FAST, "--epochs", "many", "--out", tmp_path / "r")
    assert one_line(code, err) and "--epochs" in err, err  # argparse's own errors too


def test_a_t_cal_fitted_on_train_is_not_used_for_distillation(capsys, tmp_path, teacher):
    own = _copy_run(teacher, tmp_path / "teacher")
    code, err = cqkd(capsys, "calibrate", own, "--split", "train", "--quiet")
    assert code == 0, err
    for extra in (["--teacher-calibration", "temperature"], ["--temperature", "calibrated"]):
        out = tmp_path / "student"
        code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, *extra, "--out", out)
        assert one_line(code, err) and "fitted on the train split" in err, err
        assert not out.exists()


def test_safetensors_are_opened_in_one_place():
    import re

    openers = re.compile(r"safe_open|load_file|safetensors\.torch import load\b")
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if openers.search(p.read_text()))
    assert users == ["cqkd/core/io.py"]


# ---------------------------------------------------------------- the one fault-injection point; no import-time side effects

def test_fault_points_do_nothing_unless_planned_and_hang_until_released():
    from cqkd.core import faults

    try:
        assert faults.configure({}) == ()
        faults.point("test")  # no plan: returns at once
        faults.point("step", at=3)
        plan = faults.configure({"CQKD_TEST_HANG_IN": "report", "CQKD_TEST_HANG_AT_STEP": "3",
                                 "CQKD_TEST_KILL_AFTER_EPOCH": "x"})  # not a number: no kill planned
        assert plan == (faults.Fault("report", "hang"), faults.Fault("step", "hang", 3))
        faults.point("step", at=2)  # another step: nothing
        faults.point("epoch", at=1)
        polls: list[int] = []
        faults.point("step", at=3, until=lambda: polls.append(1) or len(polls) >= 3)  # waits for 3 polls
        assert len(polls) == 3
    finally:
        faults._plan = None  # read from the environment again on next use


def test_importing_cqkd_changes_no_process_state(tmp_path):
    # umask 027 before any cqkd import: importing the modules that used to set it (or read the
    # host name) leaves it alone, and an atomic write gets 0666 & ~027 = 0640
    # (before, importing cqkd.core.io alone set it to 022 until cqkd.core.rundir set it back)
    code = ("import os; os.umask(0o027)\n"
            "import cqkd.core.io as io\n"
            "alone = os.umask(0o027)\n"
            "import cqkd.cli, cqkd.core.rundir, cqkd.sweep.claims, cqkd.sweep.launch\n"
            "mask = os.umask(0o022); os.umask(mask)\n"
            f"io.write_json({str(tmp_path / 'f.json')!r}, {{}})\n"
            f"print(oct(alone), oct(mask), oct(io.process_umask()), oct(os.stat({str(tmp_path / 'f.json')!r}).st_mode & 0o777))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0o27", "0o27", "0o27", "0o640"]
