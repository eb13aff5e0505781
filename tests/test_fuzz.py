"""Property-based tests (Hypothesis) of the configuration and command-line boundary, issue 12.

Whatever a user types and whatever bytes a file holds, cqkd either runs or says what is wrong in
one line with exit code 2 (a run whose loss becomes NaN: one line, exit 1); it never shows a
traceback and never touches a file outside the run directory. In-process cases stop where the
run directory would be created (``RunDir.prepare``), after every check; a few real commands run
to the end. The budget is fixed and derandomized, so CI runs the same cases every time
(``HYPOTHESIS_PROFILE=deep`` runs ten times as many).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqkd.cli import main
from cqkd.core.config import CONFIG_KEYS, RunConfig
from cqkd.errors import CqkdError

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = ["--dataset", "synthetic", "--train-samples", "64", "--size", "7", "--epochs", "1", "--quiet"]
COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
settings.register_profile("ci", **COMMON)
settings.register_profile("deep", **COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = 10 if PROFILE == "deep" else 1


def budget(n: int) -> settings:
    """``n`` cases (ten times more with HYPOTHESIS_PROFILE=deep), deterministic, no deadline."""
    return settings(max_examples=n * SCALE, **COMMON)


CASES: dict[str, int] = {}  # cases run per test, reported at the end of the session


def count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    total = sum(CASES.values())
    print(f"\nfuzz cases run: {total} ({', '.join(f'{k} {v}' for k, v in sorted(CASES.items()))})")


class WouldRun(Exception):
    """Raised where the run directory would be created: every check before it passed."""


@pytest.fixture
def stop_before_run(monkeypatch):
    """Stop runs where they would create their directory; load the synthetic data once."""
    from cqkd.core.rundir import RunDir
    from cqkd.data import registry

    def prepare(self, *args, **kwargs):
        raise WouldRun(str(self.path))

    monkeypatch.setattr(RunDir, "prepare", prepare)
    load = registry.DATASETS["synthetic"]
    memo: dict[tuple, object] = {}

    def cached(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in memo:
            memo[key] = load(**kwargs)
        return dataclasses.replace(memo[key])  # load_dataset replaces .train on what it gets

    monkeypatch.setitem(registry.DATASETS, "synthetic", cached)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root``, except under ``skip``."""
    out = {}
    for p in root.rglob("*"):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file() and not p.is_symlink():
            st_ = p.stat()
            out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


def outcome(capsys, argv: list[str]) -> str:
    """Run ``cqkd argv`` in-process: "run" (every check passed), "error" (one line, exit 2) or
    "ran" (exit 0); anything else fails the test (a traceback is an exception escaping here)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except WouldRun:
        return "run"
    err = capsys.readouterr().err
    if code == 0:
        return "ran"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cqkd: error: "), (code, err)
    return "error"


# ------------------------------------------------------------------------------ values a user might type

WEIRD_TEXT = st.sampled_from(["", " ", "-1", "0", "1e999", "nan", "inf", "-inf", "1.5", "0x10", "true", "none", "null",
                              "all", "auto", "calibrated", "∞", "../..", "/", "a" * 300, "1" * 40, "size=7,mode=x",
                              "flip,translate=99999", "~", "${HOME}", "'", "--force", "\t", "é"])
NUMBERS = st.one_of(st.integers(min_value=-3, max_value=70), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 2**31, 2**32, 2**63, -(2**63), 10**30, 1e-300, 1e300]))
ANY_VALUE = st.one_of(st.none(), st.booleans(), NUMBERS, WEIRD_TEXT, st.text(max_size=12),
                      st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
GOOD = {  # values that pass a field's own check, so that the checks after it are reached too
    "dataset": st.just("synthetic"), "model": st.sampled_from(["cnn-small", "cnn-large", "mlp", "resnet18"]),
    "size": st.integers(1, 28), "resize_mode": st.sampled_from(["bilinear", "bicubic", "area", "nearest"]),
    "degradation": st.sampled_from([None, "size=7", "size=14,mode=bicubic,blur=0.5,noise=0.02", "size=7,jpeg=50"]),
    "augment": st.sampled_from(["none", "flip", "flip,translate=2", "translate=1"]),
    "epochs": st.integers(1, 3), "batch_size": st.integers(1, 256), "lr": st.floats(1e-5, 1.0),
    "weight_decay": st.floats(0, 1), "optimizer": st.sampled_from(["adamw", "sgd"]),
    "schedule": st.sampled_from(["onecycle", "cosine", "constant"]), "seed": st.integers(0, 2**32 - 1),
    "label_smoothing": st.floats(0, 0.99), "temperature": st.one_of(st.floats(0.01, 100), st.just("calibrated")),
    "alpha": st.floats(0, 1), "teacher_calibration": st.sampled_from(["none", "temperature"]),
    "teacher_cache": st.sampled_from(["auto", "off"]), "views_per_image": st.sampled_from([None, 1, 8, "all", "3"]),
    "ece_bins": st.integers(1, 100), "accelerator": st.sampled_from(["auto", "cpu"]),
    "devices": st.sampled_from([1, "auto", "1"]), "strategy": st.sampled_from(["auto"]), "num_nodes": st.just(1),
    "precision": st.sampled_from(["32", "32-true", "bf16-mixed"]), "num_workers": st.integers(0, 2),
    "checkpoint_every_n_steps": st.integers(0, 500), "train_samples": st.integers(1, 4000),
    "val_size": st.one_of(st.none(), st.integers(1, 4499)), "crop_size": st.integers(1, 512),
    "skip_bad_images": st.booleans(),
}


@st.composite
def config_dicts(draw) -> dict:
    """A mapping of config keys (a few unknown ones too) to good or arbitrary values."""
    keys = draw(st.lists(st.sampled_from([*CONFIG_KEYS, "epoch", "bogus", "Seed"]), max_size=10, unique=True))
    return {k: draw(st.one_of(GOOD[k], ANY_VALUE) if k in GOOD else ANY_VALUE) for k in keys}


@given(config_dicts())
@budget(300)
def test_any_configuration_is_valid_or_one_line(tmp_path, raw):
    """RunConfig.from_dict and the hardware check: a config that round-trips, or one line."""
    from cqkd.train.setup import check_hardware

    count("configs")
    before = set(os.listdir(tmp_path))
    try:
        cfg = RunConfig.from_dict(raw)
        check_hardware(cfg)
    except CqkdError as e:
        assert "\n" not in str(e).strip() and str(e), repr(e)
        return
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.digest() == cfg.digest()
    for value in cfg.to_dict().values():
        assert not (isinstance(value, float) and not math.isfinite(value))
    assert 0 <= cfg.seed < 2**32
    assert set(os.listdir(tmp_path)) == before


RUN_OPTIONS = sorted("--" + k.replace("_", "-") for k in CONFIG_KEYS if k != "kind")


@st.composite
def command_lines(draw) -> list[str]:
    """`cqkd train|distill` with a few options of the base replaced or added, with odd values."""
    options = draw(st.lists(st.sampled_from([*RUN_OPTIONS, "--force", "--resume", "--config", "--bogus"]),
                            max_size=4, unique=True))
    argv: list[str] = []
    for option in options:
        if option in ("--force", "--resume"):
            argv.append(option)
            continue
        key = option[2:].replace("-", "_")
        value = draw(st.one_of(GOOD[key], NUMBERS, WEIRD_TEXT) if key in GOOD else st.one_of(NUMBERS, WEIRD_TEXT))
        argv += [option, "" if value is None else str(value)]
    return argv


@given(st.sampled_from(["train", "distill"]), command_lines())
@budget(120)
def test_any_command_line_runs_or_says_what_is_wrong(capsys, tmp_path, stop_before_run, fuzz_teacher, command, extra):
    count("command lines")
    out = tmp_path / f"run-{next(_serial)}"
    teacher = ["--teacher", str(fuzz_teacher)] if command == "distill" and "--teacher" not in extra else []
    before = snapshot(tmp_path.parent)
    result = outcome(capsys, [command, *BASE, *teacher, *extra, "--out", out])
    assert result in ("run", "error")
    assert snapshot(tmp_path.parent) == before  # nothing written anywhere: no run directory either
    assert not out.exists()


_serial = itertools.count()


# ------------------------------------------------------------------------------ random bytes as files

def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and a valid file with a few bytes flipped, inserted, cut or truncated."""

    @st.composite
    def edit(draw) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(len(data) - 1, 0)))
            op = draw(st.sampled_from(["flip", "insert", "cut", "truncate"]))
            byte = draw(st.integers(0, 255))
            if op == "flip" and data:
                data[i] = byte
            elif op == "insert":
                data.insert(i, byte)
            elif op == "cut" and data:
                del data[i]
            elif op == "truncate":
                del data[i:]
        return bytes(data)

    return st.one_of(st.binary(max_size=300), edit())


@pytest.fixture(scope="module")
def fuzz_teacher(tmp_path_factory) -> Path:
    """A tiny finished teacher run at 14 px."""
    out = tmp_path_factory.mktemp("fuzz-teacher") / "teacher"
    assert main(["train", "--dataset", "synthetic", "--train-samples", "64", "--size", "14", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    return out


def fresh_copy(teacher: Path, root: Path) -> Path:
    return Path(shutil.copytree(teacher, root / f"copy-{next(_serial)}", symlinks=True))


VALID_YAML = b"epochs: 1\nlr: 0.01\nseed: 3\naugment: flip\n"


@given(mutations(VALID_YAML))
@budget(60)
def test_random_bytes_as_a_config_file(capsys, tmp_path, stop_before_run, data):
    count("--config files")
    config = tmp_path / f"c-{next(_serial)}.yaml"
    config.write_bytes(data)
    out = tmp_path / "never"
    assert outcome(capsys, ["train", *BASE, "--config", config, "--out", out]) in ("run", "error")
    assert not out.exists()


@given(mutations(b'{"state": "failed", "error": "interrupted", "pid": 12, "host": "h"}'))
@budget(40)
def test_random_bytes_as_status_json(capsys, tmp_path, stop_before_run, fuzz_teacher, data):
    count("status.json files")
    run = fresh_copy(fuzz_teacher, tmp_path)
    (run / "status.json").write_bytes(data)
    before = snapshot(run)
    for extra in ([], ["--force"], ["--resume"]):
        assert outcome(capsys, ["train", "--size", "14", *BASE[:4], "--epochs", "1", "--quiet", "--out", run, *extra]) \
            in ("run", "error")
        assert snapshot(run) == before
    assert outcome(capsys, ["runs", "list", run]) == "ran"


@given(mutations(json.dumps({"plan": [{"name": "teachers/t", "group": "teachers", "path": None}],
                             "runs": {"teachers/t": {"state": "finished", "config": {"epochs": 1}}},
                             "invocations": [{"wall_s": 1.5}]}).encode()))
@budget(40)
def test_random_bytes_as_sweep_json(capsys, tmp_path, data):
    count("sweep.json files")
    d = tmp_path / f"sweep-{next(_serial)}"
    d.mkdir()
    (d / "sweep.json").write_bytes(data)
    spec = tmp_path / "s.yaml"
    spec.write_text("base: {dataset: synthetic, epochs: 1, train_samples: 64}\nsupervised: {size: 7}\n")
    assert outcome(capsys, ["sweep", spec, "--out", d, "--dry-run"]) in ("ran", "error")
    assert outcome(capsys, ["report", d]) in ("ran", "error")
    assert (d / "sweep.json").read_bytes() == data


@given(st.sampled_from(["model.safetensors", "calibration.json", ".cqkd-run.json", "config.yaml"]), st.data())
@budget(60)
def test_random_bytes_in_a_teacher_run(capsys, tmp_path, stop_before_run, fuzz_teacher, name, data):
    """A teacher's weights, calibration, marker or config replaced by random or damaged bytes."""
    count(f"teacher {name}")
    teacher = fresh_copy(fuzz_teacher, tmp_path)
    valid = (teacher / name).read_bytes() if (teacher / name).exists() else b'{"t_cal": 1.5, "split": "val"}'
    (teacher / name).write_bytes(data.draw(mutations(valid[:2000])))
    out = tmp_path / "student"
    outside = snapshot(tmp_path, skip=teacher)
    extra = ["--teacher-calibration", "temperature"] if name == "calibration.json" else []
    assert outcome(capsys, ["distill", *BASE, "--teacher", teacher, *extra, "--out", out]) in ("run", "error")
    assert outcome(capsys, ["evaluate", teacher, "--quiet"]) in ("ran", "error")
    assert snapshot(tmp_path, skip=teacher) == outside and not out.exists()
    owned = set(json.loads((fuzz_teacher / ".cqkd-run.json").read_text())["files"])
    for p in teacher.rglob("*"):  # in the teacher, only cqkd's own files may have been (re)written
        rel = str(p.relative_to(teacher))
        if p.is_file() and rel.split("/")[0] not in ("cache", "eval") and rel not in owned:
            assert (fuzz_teacher / rel).exists(), rel


@given(mutations(b"PK\x03\x04" + bytes(range(64))), st.sampled_from(["w.safetensors", "w.pt", "w.pth"]))
@budget(40)
def test_random_bytes_as_a_teacher_weights_file(capsys, tmp_path, stop_before_run, data, name):
    count("--teacher FILE")
    weights = tmp_path / f"{next(_serial)}-{name}"
    weights.write_bytes(data)
    out = tmp_path / "student"
    assert outcome(capsys, ["distill", *BASE, "--teacher", weights, "--teacher-model", "cnn-small", "--out", out]) \
        in ("run", "error")
    assert not out.exists()


# ------------------------------------------------------------------------------ a few real commands, to the end

@given(st.lists(st.sampled_from(["--lr", "--weight-decay", "--seed", "--optimizer", "--schedule", "--label-smoothing",
                                 "--batch-size", "--augment", "--views-per-image", "--resize-mode"]),
                min_size=1, max_size=3, unique=True), st.data())
@budget(3)
def test_a_few_real_commands(tmp_path, options, data):
    """``python -m cqkd train`` with odd values, to the end: finished (exit 0), diverged (exit 1,
    one line) or refused (exit 2, one line); no traceback, nothing outside --out."""
    count("real commands")
    argv = []
    for option in options:
        key = option[2:].replace("-", "_")
        good = st.integers(16, 128) if key == "batch_size" else GOOD[key]  # (a few steps: a short run)
        argv += [option, str(data.draw(st.one_of(good, WEIRD_TEXT)))]
    out = tmp_path / f"run-{next(_serial)}"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cqkd", "train", *BASE, *argv, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(tmp_path, skip=out) == before
    if proc.returncode == 0:
        assert json.loads((out / "status.json").read_text())["state"] == "finished"
    else:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("cqkd: error: ")]
        assert proc.returncode in (1, 2) and len(errors) == 1, proc.stderr
        assert proc.returncode == 1 or not out.exists()
