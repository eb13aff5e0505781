"""Issue 25: faults a hostile probe found. One test (at least) per numbered failure:

1. outputs that are devices, FIFOs or sockets; 2. symbolic links out of a run; 3. report and demo
in a user's directory; 4. recorded paths; 5. the teacher's memoised test outputs; 6. image modes
in predict; 7. signals in predict and export; 8. numbers that overflow later; 9. the demo's resume
hint; 10. a sweep replacing a run it did not make.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cqkd.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = ["--dataset", "synthetic", "--train-samples", "300", "--size", "7", "--epochs", "1", "--quiet"]


def cqkd(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(code: int, err: str) -> bool:
    """Exit 2 and exactly one line on stderr, in cqkd's form."""
    return code == 2 and err.startswith("cqkd: error: ") and err.count("\n") == 1


def spawn(*argv, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.Popen([sys.executable, "-m", "cqkd", *map(str, argv)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache", "eval", ".cqkd.lock", "export"))
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny finished teacher run at 14 px."""
    out = tmp_path_factory.mktemp("teacher") / "t14"
    assert main(["train", *FAST, "--size", "14", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 14 px grey PNG for predict."""
    path = tmp_path_factory.mktemp("pics") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 14), dtype=np.uint8)).save(path)
    return path


def special_files(root: Path) -> dict[str, Path]:
    """A FIFO, a socket and (where this user may make one) a character device like /dev/null."""
    root.mkdir(parents=True, exist_ok=True)
    made = {"fifo": root / "fifo"}
    os.mkfifo(made["fifo"])
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    made["socket"] = root / "sock"
    try:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made["device"] = root / "null"
    except (PermissionError, OSError):
        pass
    return made


# ---------------------------------------------------------------- 1. outputs that are not regular files

def test_1_an_output_that_is_a_device_fifo_or_socket_is_refused(capsys, tmp_path, teacher, picture):
    from cqkd.core.io import write_text
    from cqkd.errors import CqkdError

    special = special_files(tmp_path / "special")
    kinds = {name: stat.S_IFMT(os.lstat(p).st_mode) for name, p in special.items()}
    for name, path in special.items():
        code, err = cqkd(capsys, "predict", teacher, picture, "--out", path, "--force", "--quiet")
        assert one_line(code, err) and "not a regular file" in err, (name, err)
        with pytest.raises(CqkdError, match="not a regular file"):
            write_text(path, "x")  # the library's one way to write, asked directly
        code, err = cqkd(capsys, "export", teacher, "--format", "torchscript", "--out", path, "--force")
        assert one_line(code, err) and "not a regular file" in err, (name, err)
    # a symbolic link to a device is followed for the check (/dev/stdout is a link)
    (tmp_path / "link").symlink_to(special["fifo"])
    code, err = cqkd(capsys, "predict", teacher, picture, "--out", tmp_path / "link", "--force", "--quiet")
    assert one_line(code, err) and "a FIFO" in err, err
    assert {name: stat.S_IFMT(os.lstat(p).st_mode) for name, p in special.items()} == kinds
    assert (tmp_path / "link").is_symlink()
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ---------------------------------------------------------------- 2. symbolic links out of a run

def test_2_cqkd_never_follows_a_symlinked_directory_out_of_a_run(capsys, tmp_path, teacher):
    own = copy_run(teacher, tmp_path / "teacher")
    user = tmp_path / "user"
    for name in (".tmp-abc-1", ".trash-abc-2"):
        (user / name).mkdir(parents=True)
        (user / name / "precious.txt").write_text("mine")
    before = snapshot(user)
    (own / "cache").symlink_to(user)
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, "--out", tmp_path / "s1")
    assert one_line(code, err) and "symbolic link" in err and "cache" in err, err
    assert snapshot(user) == before and sorted(p.name for p in user.iterdir()) == [".tmp-abc-1", ".trash-abc-2"]
    assert not (tmp_path / "s1").exists()  # refused before the run directory was made

    (own / "cache").unlink()  # eval/ (the teacher's memoised test outputs): not written beyond the link
    (own / "eval").symlink_to(user)
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, "--teacher-cache", "off", "--out", tmp_path / "s2")
    assert code == 0, err
    assert snapshot(user) == before

    (own / "export").symlink_to(user)  # export/: the default output of cqkd export
    code, err = cqkd(capsys, "export", own, "--format", "torchscript")
    assert one_line(code, err) and "symbolic link" in err, err
    assert snapshot(user) == before

    sweep = tmp_path / "sweep"  # figures/ of a report
    copy_run(teacher, sweep / "t")
    (sweep / "figures").symlink_to(user)
    code, err = cqkd(capsys, "report", sweep)
    assert one_line(code, err) and "symbolic link" in err, err
    assert snapshot(user) == before and not (sweep / "report.md").exists()


# ---------------------------------------------------------------- 3. report and demo in a user's directory

def test_3_report_and_demo_never_overwrite_a_users_files(capsys, tmp_path, teacher):
    mine = tmp_path / "mine"
    copy_run(teacher, mine / "t")
    for name in ("report.md", "results.csv"):
        (mine / name).write_text("my own notes")
    code, err = cqkd(capsys, "report", mine)
    assert one_line(code, err) and "was not written by cqkd" in err, err
    assert (mine / "report.md").read_text() == "my own notes" and (mine / "results.csv").read_text() == "my own notes"
    assert not (mine / "figures").exists()

    runs = tmp_path / "runs"  # a folder of runs with no report yet: written, then rewritten (cqkd's own)
    copy_run(teacher, runs / "t")
    assert cqkd(capsys, "report", runs)[0] == 0
    code, err = cqkd(capsys, "report", runs)
    assert code == 0, err
    assert "report.md" in json.loads((runs / ".cqkd-outputs.json").read_text())["files"]

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "summary.md").write_text("my summary")
    code, err = cqkd(capsys, "demo", "--out", demo, "--epochs", "1", "--train-samples", "100", "--quiet")
    assert one_line(code, err) and "not a cqkd sweep" in err, err
    assert (demo / "summary.md").read_text() == "my summary" and sorted(p.name for p in demo.iterdir()) == ["summary.md"]


# ---------------------------------------------------------------- 4. recorded paths

def test_4_recorded_paths_mean_the_same_from_anywhere(capsys, tmp_path, teacher, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    copy_run(teacher, work / "t")
    monkeypatch.chdir(work)
    code, err = cqkd(capsys, "distill", *FAST, "--teacher", "t", "--out", "s")
    assert code == 0, err
    cfg = yaml.safe_load((work / "s" / "config.yaml").read_text())
    assert cfg["teacher"] == str(work / "t")  # absolute
    metrics = json.loads((work / "s" / "metrics.json").read_text())
    digest = metrics["teacher_digest"]
    assert len(digest) == 16

    # another run at the same relative path elsewhere: the student is still evaluated against its own teacher
    (elsewhere).mkdir()
    assert main(["train", *FAST, "--size", "14", "--seed", "5", "--out", str(elsewhere / "t")]) == 0
    monkeypatch.chdir(elsewhere)
    code, err = cqkd(capsys, "evaluate", work / "s", "--quiet")
    assert code == 0, err

    # a different teacher put where the recorded one was: refused, naming both digests
    shutil.move(str(work / "t"), str(tmp_path / "moved"))
    shutil.copytree(elsewhere / "t", work / "t")
    code, err = cqkd(capsys, "evaluate", work / "s", "--quiet")
    assert one_line(code, err) and "is not the one" in err and digest in err, err

    # the teacher moved away: the message names the recorded path and where it was recorded
    shutil.rmtree(work / "t")
    code, err = cqkd(capsys, "evaluate", work / "s", "--quiet")
    assert one_line(code, err) and "config.yaml" in err and str(work / "t") in err and "does not exist" in err, err
    assert "--teacher" not in err


def test_4_a_sweep_replanned_from_another_directory_knows_its_finished_runs(tmp_path, monkeypatch):
    from cqkd.sweep.plan import plan_sweep
    from cqkd.sweep.runner import run_sweep
    from cqkd.sweep.state import SweepDir, assess

    spec = {"base": {"dataset": "synthetic", "train_samples": 200, "epochs": 1, "accelerator": "cpu"},
            "teachers": {"t": {"model": "cnn-small", "size": 14}},
            "distill": {"teacher": "t", "model": "cnn-small", "size": 7, "temperature": 4}}
    monkeypatch.chdir(tmp_path)
    assert run_sweep(plan_sweep(spec, "sw"), progress=False, print_fn=lambda s: None).ok
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    plan = plan_sweep(spec, "../sw")
    todo, done = assess(plan, SweepDir(plan.out).load(), force=False)
    assert todo == [] and len(done) == 2
    # and a moved sweep directory too
    monkeypatch.chdir(tmp_path)
    shutil.move("sw", "moved")
    plan = plan_sweep(spec, "moved")
    todo, done = assess(plan, SweepDir(plan.out).load(), force=False)
    assert todo == [] and len(done) == 2


# ---------------------------------------------------------------- 5. the teacher's memoised test outputs

def make_folder(root: Path, shift: int) -> Path:
    """DIR/train/<class>/ and DIR/val/<class>/ PNGs; ``shift`` moves each class's colour to another channel."""
    rng = np.random.default_rng(shift)
    for split, n in (("train", 4), ("val", 3)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((24, 24, 3)) * 60).astype(np.uint8)
                a[..., (c + shift) % 3] += 180
                Image.fromarray(a).save(d / f"img{i}.png")
    return root


def test_5_the_teachers_test_outputs_are_keyed_by_the_test_images(capsys, tmp_path):
    from safetensors.torch import save_file

    from cqkd.core.config import RunConfig
    from cqkd.core.rundir import RunDir
    from cqkd.nets.registry import build_model

    a, b = make_folder(tmp_path / "a", 0), make_folder(tmp_path / "b", 1)
    t = RunDir(tmp_path / "t")
    t.prepare(RunConfig.from_dict({"kind": "train", "dataset": "imagefolder", "model": "cnn-small", "size": 24,
                                   "crop_size": 24, "epochs": 1}))
    torch.manual_seed(0)
    net = build_model("cnn-small", 3, 3, 24)
    with torch.no_grad():
        net(torch.rand(8, 3, 24, 24))
        net.head[-1].weight.mul_(30)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(t.weights_file))
    t.metrics_file.write_text("{}")
    t.set_state("finished")
    common = ["--dataset", "imagefolder", "--crop-size", "24", "--size", "8", "--val-size", "3", "--epochs", "1",
              "--batch-size", "6", "--teacher", t.path, "--quiet"]
    for data, out in ((a, "sa"), (b, "sb")):
        code, err = cqkd(capsys, "distill", *common, "--data-dir", data, "--out", tmp_path / out)
        assert code == 0, err
    assert len(list((t.path / "eval").glob("test-*.pt"))) == 2  # one per test split
    shutil.rmtree(t.path / "eval")  # the teacher's outputs on b, computed afresh
    code, err = cqkd(capsys, "distill", *common, "--data-dir", b, "--out", tmp_path / "fresh")
    assert code == 0, err
    got, fresh = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("sb", "fresh"))
    assert got["teacher_metrics"] == fresh["teacher_metrics"] and got["kl_teacher_student"] == fresh["kl_teacher_student"]


# ---------------------------------------------------------------- 6. image modes

def png16(arr: np.ndarray, path: Path) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) written by hand: Pillow cannot write 48-bit RGB."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_6_every_image_mode_is_read_as_its_8_bit_picture(capsys, tmp_path, teacher):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (14, 14), dtype=np.uint8)
    d = tmp_path / "img"
    d.mkdir()
    Image.fromarray(rgb).save(d / "rgb8.png")
    Image.fromarray(grey).save(d / "grey8.png")
    pairs = {}
    png16(grey.astype(np.uint16) * 257, d / "grey16.png")  # v * 257: the same picture at 16 bits
    pairs["grey16.png"] = "grey8.png"
    png16(rgb.astype(np.uint16) * 257, d / "rgb48.png")
    pairs["rgb48.png"] = "rgb8.png"
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.tiff")  # PIL's CMYK <-> RGB is exact with K = 0
    pairs["cmyk.tiff"] = "rgb8.png"
    alpha = np.dstack([rgb, rng.integers(0, 256, (14, 14), dtype=np.uint8)])
    Image.fromarray(alpha, "RGBA").save(d / "rgba.png")
    pairs["rgba.png"] = "rgb8.png"
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(d / "palette.png")
    pal.convert("RGB").save(d / "palette-rgb8.png")
    pairs["palette.png"] = "palette-rgb8.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored rotated the other way
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(d / "exif.png", exif=exif.tobytes())
    pairs["exif.png"] = "rgb8.png"
    out = tmp_path / "p.jsonl"
    code, err = cqkd(capsys, "predict", teacher, *sorted(d.iterdir()), "--format", "jsonl", "--out", out, "--quiet")
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    for mode, ref in pairs.items():
        assert rows[mode]["probs"] == rows[ref]["probs"] and rows[mode]["classes"] == rows[ref]["classes"], mode

    from cqkd.data.folder import (
        decode_rgb,  # the training image folders read them the same way
    )

    for mode, ref in pairs.items():
        assert torch.equal(decode_rgb(str(d / mode)), decode_rgb(str(d / ref))), mode


# ---------------------------------------------------------------- 7. signals in predict and export

def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The output of ``proc``; if it has not ended within ``timeout`` s, SIGTERM it, then kill it, and fail."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"blocked; SIGTERM ended it (rc={proc.returncode}): {err[-500:]}")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("blocked, and SIGTERM did not end it")


def test_7_predict_on_a_fifo_neither_blocks_nor_ignores_signals(tmp_path, teacher, picture):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    proc = spawn("predict", teacher, fifo, "--quiet")
    out, err = finish(proc, 90)
    assert proc.returncode == 2 and "pipe.png" in err and "not a regular file" in err, err
    assert err.strip().count("\n") == 0
    proc = spawn("predict", teacher, fifo, picture, "--skip-bad-images", "--quiet")
    out, err = finish(proc, 90)
    assert proc.returncode == 3 and "skipped 1 unreadable file(s)" in err, err
    assert len(out.strip().splitlines()) == 2  # the header and the readable picture


def test_7_sigterm_during_the_onnx_export_is_an_interruption(tmp_path, teacher):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    own = copy_run(teacher, tmp_path / "t")
    proc = spawn("export", own, CQKD_TEST_HANG_IN="export")
    deadline = time.monotonic() + 120
    line = ""
    while "cqkd-test: waiting in export" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the export ended before it waited"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "cqkd: interrupted by SIGTERM", err
    assert "exporter failed" not in err
    assert not list((own / "export").glob("*")) if (own / "export").exists() else True


def test_7_sigterm_inside_the_onnx_exporter_is_reported_as_interrupted(capsys, tmp_path, teacher, monkeypatch):
    """SIGTERM arriving while torch.onnx.export runs (its handler raises there), in-process."""
    pytest.importorskip("onnx")
    from cqkd.core.signals import raise_on_sigterm

    own = copy_run(teacher, tmp_path / "t")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: raise_on_sigterm())
    code, err = cqkd(capsys, "export", own)
    assert code == 143 and err.strip().splitlines()[-1] == "cqkd: interrupted by SIGTERM", err
    assert "exporter failed" not in err
    assert not [p for p in (own / "export").rglob("*") if p.is_file()] if (own / "export").exists() else True


def test_7_an_interruption_wrapped_by_the_exporter_is_still_an_interruption():
    from cqkd.deploy.export import reraise_interruption
    from cqkd.errors import RunInterrupted

    try:
        try:
            raise RunInterrupted("SIGTERM", None, None)
        except RunInterrupted as inner:
            raise RuntimeError("Failed to export the model with torch.export") from inner
    except RuntimeError as wrapped:
        with pytest.raises(RunInterrupted):
            reraise_interruption(wrapped)
    reraise_interruption(ValueError("a plain failure"))  # returns: reported as a failed export


# ---------------------------------------------------------------- 8. numbers that overflow later

def test_8_temperatures_are_bounded_by_what_the_computation_holds(capsys, tmp_path, teacher):
    for value in ("1e200", "1e-300", "100.5"):
        out = tmp_path / f"run-{value}"
        code, err = cqkd(capsys, "distill", *FAST, "--teacher", teacher, "--temperature", value, "--out", out)
        assert one_line(code, err) and "temperature=" in err and "[0.01, 100]" in err, err
        assert not out.exists()
    own = copy_run(teacher, tmp_path / "t")
    for t_cal in (1e308, 1e-300):
        (own / "calibration.json").write_text(json.dumps({"method": "temperature", "t_cal": t_cal, "split": "val"}))
        out = tmp_path / f"cal-{t_cal}"
        code, err = cqkd(capsys, "distill", *FAST, "--teacher", own, "--temperature", "calibrated", "--out", out)
        assert one_line(code, err) and "t_cal=" in err and "range" in err, err
        assert not out.exists()


# ---------------------------------------------------------------- 9. the demo's hint

def test_9_the_hint_after_an_interrupted_demo_is_a_command_that_runs(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--epochs", "1", "--train-samples", "100", "--quiet"]
    proc = spawn(*argv, CQKD_TEST_HANG_IN="data")
    deadline = time.monotonic() + 120
    line = ""
    while "cqkd-test: waiting in data" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "the demo ended before it waited"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "--resume" not in last and "continue with: cqkd demo --out" in last, last
    hinted = last.split("continue with: ", 1)[1].split()
    assert hinted[0] == "cqkd" and hinted[1:] == argv  # the same command: it parses and continues the sweep
    from cqkd.cli import build_parser

    build_parser().parse_args(hinted[1:])


# ---------------------------------------------------------------- 10. a sweep's foreign runs

def test_10_a_sweep_never_replaces_a_run_it_did_not_make(capsys, tmp_path):
    base = {"dataset": "synthetic", "train_samples": 200, "epochs": 1, "accelerator": "cpu"}
    spec = {"base": base, "supervised": {"model": "cnn-small", "size": 7, "seed": [0]}}
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sw"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--quiet"]) == 0
    # a grid point added later plans a directory that the user filled with a run of another config
    spec["supervised"]["seed"] = [0, 1]
    sweep_file.write_text(yaml.safe_dump(spec))
    from cqkd.sweep.plan import load_sweep

    planned = [r for r in load_sweep(sweep_file, out).runs if r.cfg.seed == 1][0]
    code, err = cqkd(capsys, "train", *FAST, "--seed", "7", "--out", planned.path)
    assert code == 0, err
    before = (planned.path / "model.safetensors").read_bytes()
    capsys.readouterr()
    code = main(["sweep", str(sweep_file), "--out", str(out), "--dry-run"])
    captured = capsys.readouterr()
    assert code == 2 and f"[foreign] {planned.name}" in captured.out, captured
    assert "did not make" in captured.err and captured.err.count("\n") == 1
    code, err = cqkd(capsys, "sweep", sweep_file, "--out", out, "--quiet")
    assert one_line(code, err) and "did not make" in err and str(planned.path) in err, err
    code, err = cqkd(capsys, "sweep", sweep_file, "--out", out, "--quiet", "--force")
    assert one_line(code, err) and "did not make" in err, err
    assert (planned.path / "model.safetensors").read_bytes() == before
    assert yaml.safe_load((planned.path / "config.yaml").read_text())["seed"] == 7
