"""Temperature scaling, run calibration, the two distillation temperatures, reliability plots
and the calibration commands, down to an end-to-end run on a tiny synthetic teacher."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cqkd import cli
from cqkd.calibration.metrics import all_metrics, mean_kl, nll
from cqkd.calibration.scaling import TemperatureScaler, read_calibration
from cqkd.distill.loss import distillation_loss, soft_targets
from cqkd.distill.methods import (
    kd as kd_method,  # the kd method calls distillation_loss
)
from cqkd.errors import CqkdError
from cqkd.train.calibrate import calibrate_run, run_t_cal

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def calibrated_model_logits(n: int, k: int = 10, seed: int = 0, scale: float = 2.0):
    """Logits z of a calibrated model: labels are drawn from softmax(z) itself."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(F.softmax(z, -1), 1, generator=g).squeeze(1)
    return z, y


# ------------------------------------------------------------------------------ the scaler

@pytest.mark.parametrize("true_t", [2.5, 0.5])
def test_scaler_recovers_a_known_temperature(true_t: float) -> None:
    z, y = calibrated_model_logits(20000)
    scaler = TemperatureScaler().fit(true_t * z, y)
    assert scaler.t_cal == pytest.approx(true_t, rel=0.05)
    assert scaler.nll_after <= scaler.nll_before
    assert not scaler.at_bound


def test_scaler_finds_the_minimum_and_never_worsens_nll() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(500, 7, generator=g) * 4  # unrelated to the labels: T_cal grows large
    labels = torch.randint(0, 7, (500,), generator=g)
    s = TemperatureScaler().fit(logits, labels)
    t = s.t_cal
    assert s.nll_after == pytest.approx(nll(logits.double() / t, labels), abs=1e-12)
    assert s.nll_after <= nll(logits, labels)
    for factor in (0.99, 1.01):  # a minimum, not just an improvement
        assert nll(logits.double() / (t * factor), labels) >= s.nll_after
    # temperature scaling never changes the prediction
    assert torch.equal(s.transform(logits).argmax(-1), logits.argmax(-1))


def test_scaler_keeps_t_one_for_a_calibrated_model() -> None:
    z, y = calibrated_model_logits(20000, seed=1)
    s = TemperatureScaler().fit(z, y)
    assert s.t_cal == pytest.approx(1.0, rel=0.05)
    assert s.nll_after <= s.nll_before


def test_scaler_on_separable_data_stops_at_the_range() -> None:
    # every prediction right: the NLL keeps falling as T -> 0, so the optimum is the lower bound
    labels = torch.arange(30) % 3
    logits = F.one_hot(labels, 3).double() * 2 + 0.1 * torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = TemperatureScaler(t_min=0.05).fit(logits, labels)
    assert s.at_bound and s.t_cal == pytest.approx(0.05, rel=1e-6)
    assert s.nll_after < s.nll_before


def test_scaler_guard_keeps_t_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # if the search returned something worse than T = 1 (here: a search range that excludes the
    # optimum 1 is impossible, so fake a broken NLL that is lowest at T = 1 only when u = 0 exactly)
    import cqkd.calibration.scaling as C

    real = C._nll_at
    monkeypatch.setattr(C, "_nll_at", lambda z, y, t: real(z, y, t) - (1.0 if t == 1.0 else 0.0))
    z, y = calibrated_model_logits(2000, seed=2)
    s = TemperatureScaler().fit(2.5 * z, y)
    assert s.t_cal == 1.0 and s.nll_after == s.nll_before


def test_scaler_errors_and_json_round_trip(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        TemperatureScaler().transform(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        TemperatureScaler().fit(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        TemperatureScaler(t_cal=-1.0)
    z, y = calibrated_model_logits(1000)
    s = TemperatureScaler().fit(3 * z, y)
    s.save(tmp_path / "t.json")
    loaded = TemperatureScaler.load(tmp_path / "t.json")
    assert loaded.t_cal == s.t_cal and loaded.nll_after == s.nll_after
    assert torch.equal(loaded.transform(z), z / s.t_cal)
    (tmp_path / "bad.json").write_text(json.dumps({"method": "temperature", "t_cal": 0}))
    with pytest.raises(CqkdError, match="t_cal"):
        TemperatureScaler.load(tmp_path / "bad.json")


def test_calibration_schema_and_older_scaler_files(tmp_path: Path) -> None:
    z, y = calibrated_model_logits(500)
    s = TemperatureScaler().fit(2 * z, y)
    s.save(tmp_path / "t.json")
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["schema"] == 2 and written["n_fit"] == 500 and written["split"] is None
    assert written["nll_fit_after"] == s.nll_after and written["t_min"] == 1e-2
    # the scaler's layout before schema 2: n, nll_before, nll_after, no schema key
    old = {"method": "temperature", "t_cal": 1.5, "nll_before": 0.9, "nll_after": 0.8, "n": 40,
           "at_bound": False, "t_min": 0.05, "t_max": 20.0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = TemperatureScaler.load(tmp_path / "old.json")
    assert (loaded.t_cal, loaded.nll_before, loaded.nll_after, loaded.n) == (1.5, 0.9, 0.8, 40)
    assert (loaded.t_min, loaded.t_max) == (0.05, 20.0)
    (tmp_path / "new.json").write_text(json.dumps({**written, "schema": 3}))
    with pytest.raises(CqkdError, match="schema 3"):
        TemperatureScaler.load(tmp_path / "new.json")


# ------------------------------------------------------------------------------ the two temperatures

def test_soft_targets_with_teacher_calibration() -> None:
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    t_cal, t = 1.7, 4.0
    expected = F.softmax(z_t / (t_cal * t), dim=-1)
    assert torch.equal(soft_targets(z_t, t, t_cal), expected)
    # the loss's KL uses the same targets: KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)
    terms = distillation_loss(z_s, z_t, y, t, alpha=0.5, t_cal=t_cal)
    log_s = F.log_softmax(z_s / t, -1)
    kl = (expected * (expected.log() - log_s)).sum(-1).mean()
    assert terms["kl"] == pytest.approx(float(kl), abs=1e-6)
    assert terms["loss"] == pytest.approx(float(0.5 * F.cross_entropy(z_s, y) + 0.5 * t**2 * kl), abs=1e-5)


# ------------------------------------------------------------------------------ runs (end to end)

def _cli(argv: list[str]) -> int:
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic teacher (1 epoch on 300 images), trained through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert _cli(["train", "--dataset", "synthetic", "--train-samples", 300, "--epochs", 1, "--out", out, "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def student(teacher: Path) -> Path:
    """A CQKD student at 14 px with a calibrated teacher and T = 2."""
    out = teacher.parent / "student"
    rc = _cli(["distill", "--dataset", "synthetic", "--train-samples", 300, "--epochs", 1, "--size", 14,
               "--teacher", teacher, "--teacher-calibration", "temperature", "--temperature", 2,
               "--out", out, "--quiet"])
    assert rc == 0
    return out


def test_predict_logits_is_the_evaluation_view(teacher: Path) -> None:
    from cqkd.core.rundir import RunDir
    from cqkd.train.predict import predict_logits

    saved = RunDir(teacher).test_logits()
    again = predict_logits(teacher, "test")
    assert torch.equal(again["labels"], saved["labels"])
    assert torch.allclose(again["logits"], saved["logits"], atol=1e-5)


def test_cqkd_calibrate_end_to_end(teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cqkd.train.predict import predict_logits

    (teacher / "calibration.json").unlink(missing_ok=True)
    assert _cli(["calibrate", teacher, "--ece-bins", 10]) == 0
    printed = capsys.readouterr().out
    assert "NLL before" in printed and "T_cal" in printed
    cal = json.loads((teacher / "calibration.json").read_text())
    assert cal["split"] == "val" and cal["ece_bins"] == 10 and cal["n_fit"] == 500
    assert set(cal["metrics"]) == {"val", "test"}
    val = predict_logits(teacher, "val")
    independent = TemperatureScaler().fit(val["logits"], val["labels"])
    assert cal["t_cal"] == pytest.approx(independent.t_cal, rel=1e-9)
    m = cal["metrics"]["val"]
    assert m["nll_after"] <= m["nll_before"]
    assert m["nll_after"] == pytest.approx(nll(val["logits"].double() / cal["t_cal"], val["labels"]), abs=1e-9)
    assert m["ece_before"] == pytest.approx(all_metrics(val["logits"], val["labels"], 10)["ece"], abs=1e-9)
    assert f"{cal['t_cal']:.4f}" in printed


def test_calibrating_on_test_is_refused(teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (teacher / "calibration.json").read_text() if (teacher / "calibration.json").exists() else None
    assert _cli(["calibrate", teacher, "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "calibrating on the test split is not allowed" in err and len(err.strip().splitlines()) == 1
    after = (teacher / "calibration.json").read_text() if (teacher / "calibration.json").exists() else None
    assert before == after
    with pytest.raises(CqkdError, match="test split"):
        calibrate_run(teacher, split="test")


def test_teacher_temperature_reads_fits_and_refits_stale(teacher: Path) -> None:
    cal_file = teacher / "calibration.json"
    cal_file.unlink(missing_ok=True)
    with pytest.raises(CqkdError, match="cqkd calibrate"):
        run_t_cal(str(teacher), fit_if_missing=False)
    t = run_t_cal(str(teacher))  # fits on val and writes the file
    assert cal_file.exists() and read_calibration(teacher)["t_cal"] == t and read_calibration(teacher)["split"] == "val"
    data = json.loads(cal_file.read_text())
    data["t_cal"] = 3.0  # a value we can recognise
    cal_file.write_text(json.dumps(data))
    assert run_t_cal(str(teacher)) == 3.0  # read, not refitted
    data["at_bound"] = True  # e.g. a teacher right on all of val: T_cal -> 0
    cal_file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="edge of the search range"):
        assert run_t_cal(str(teacher)) == 3.0
    data["at_bound"] = False
    data["weights_digest"] = "0000000000000000"  # fitted for other weights: stale
    cal_file.write_text(json.dumps(data))
    with pytest.raises(CqkdError, match="other weights"):
        run_t_cal(str(teacher), fit_if_missing=False)
    assert run_t_cal(str(teacher)) == pytest.approx(t, rel=1e-12)


def test_cqkd_calibrate_writes_the_schema_and_reads_the_older_run_layout(teacher: Path) -> None:
    cal_file = teacher / "calibration.json"
    t = run_t_cal(str(teacher))
    current = json.loads(cal_file.read_text())
    assert current["schema"] == 2 and current["split"] == "val" and current["t_min"] == 1e-2
    assert {"n_fit", "nll_fit_before", "nll_fit_after", "ece_bins", "metrics", "weights_digest"} <= set(current)
    # a run's calibration.json as cqkd calibrate wrote it before schema 2: no schema, no search range
    old = {k: v for k, v in current.items() if k not in ("schema", "t_min", "t_max")}
    try:
        cal_file.write_text(json.dumps(old))
        data = read_calibration(teacher)
        assert data["schema"] == 2 and data["t_cal"] == t and (data["t_min"], data["t_max"]) == (1e-2, 1e2)
        assert data["n_fit"] == current["n_fit"] and data["metrics"] == current["metrics"]
        assert run_t_cal(str(teacher), fit_if_missing=False) == t  # read, not refitted
        assert TemperatureScaler.load(cal_file).n == current["n_fit"]
    finally:
        cal_file.write_text(json.dumps(current))


def test_distillation_records_both_temperatures(teacher: Path, student: Path) -> None:
    t_cal = json.loads((teacher / "calibration.json").read_text())["t_cal"]
    m = json.loads((student / "metrics.json").read_text())
    assert m["temperature"] == 2.0 and m["temperature_mode"] == "fixed"
    assert m["teacher_calibration"] == "temperature"
    assert m["t_cal"] == pytest.approx(t_cal) and m["teacher_temperature_applied"] == pytest.approx(t_cal)
    png = student / "reliability.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_training_path_uses_calibrated_soft_targets(teacher: Path, student: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() + CQKDModule.training_step divide the teacher's logits by T_cal·T."""
    import cqkd.train.fit as training
    import cqkd.train.module as train_module
    from cqkd.core.rundir import RunDir

    t_cal = json.loads((teacher / "calibration.json").read_text())["t_cal"]
    seen: dict = {}

    def spy(z_s, z_t, y, temperature, alpha, teacher_temperature=1.0, label_smoothing=0.0):
        seen.update(z_s=z_s.detach(), z_t=z_t.detach(), T=temperature, T_cal=teacher_temperature)
        seen["terms"] = distillation_loss(z_s, z_t, y, temperature, alpha, teacher_temperature, label_smoothing)
        return seen["terms"]

    monkeypatch.setattr(kd_method, "distillation_loss", spy)
    for temperature, expect_t in ((2.0, 2.0), ("calibrated", t_cal)):
        cfg = RunDir(student).config().replace(temperature=temperature)
        splits, model, t = training.prepare(cfg)
        assert t.t_cal == pytest.approx(t_cal)
        module = train_module.CQKDModule(model, cfg, splits.info, t)
        assert module.step.t_cal == pytest.approx(t_cal)  # the student's cfg calibrates its teacher
        x, y = splits.train.images[:16], splits.train.labels[:16]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            module.training_step((x, y, torch.arange(16)), 0)
        assert seen["T"] == pytest.approx(expect_t) and seen["T_cal"] == pytest.approx(t_cal)
        targets = F.softmax(seen["z_t"] / (t_cal * expect_t), -1)
        assert torch.allclose(soft_targets(seen["z_t"], seen["T"], seen["T_cal"]), targets, atol=1e-7)
        log_s = F.log_softmax(seen["z_s"] / expect_t, -1)
        kl = (targets * (targets.clamp_min(1e-30).log() - log_s)).sum(-1).mean()
        assert float(seen["terms"]["kl"].detach()) == pytest.approx(float(kl), abs=1e-5)


def test_teacher_seen_from_the_students_side(teacher: Path, student: Path) -> None:
    """teacher_lr_metrics and kl_teacher_student, recomputed independently of test_step."""
    from cqkd.core.rundir import RunDir
    from cqkd.data.registry import load_dataset
    from cqkd.nets.teacher import load_teacher

    run = RunDir(student)
    saved, m = run.test_logits(), run.metrics()
    splits = load_dataset("synthetic")
    t = load_teacher(str(teacher), splits.info)
    x = splits.test.images.float() / 255
    x_lr = F.interpolate(x, size=(14, 14), mode="bilinear", antialias=True, align_corners=False)
    x_up = F.interpolate(x_lr, size=(28, 28), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    with torch.no_grad():
        z_lr = t.model((x_up - mean) / std)
        z_hr = t.model((x - mean) / std)
    assert torch.allclose(saved["teacher_lr_logits"], z_lr, atol=1e-4)
    assert torch.allclose(saved["teacher_logits"], z_hr, atol=1e-4)
    assert m["teacher_lr_metrics"]["top1"] == pytest.approx(all_metrics(z_lr, saved["labels"])["top1"])
    assert m["teacher_metrics"]["nll"] == pytest.approx(all_metrics(z_hr, saved["labels"])["nll"], abs=1e-5)
    kl = mean_kl(z_hr, saved["logits"])
    assert m["kl_teacher_student"] == pytest.approx(kl, abs=1e-5) and kl >= 0


def test_evaluate_with_bootstrap(teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["evaluate", teacher, "--bootstrap", 200, "--ece-bins", 10, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap" in out and "200 resamples" in out
    assert _cli(["evaluate", teacher, "--bootstrap", -1]) == 2


# ------------------------------------------------------------------------------ plots

def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary file left


def test_reliability_diagram_one_and_several(tmp_path: Path) -> None:
    from cqkd.calibration.plots import reliability_diagram

    z, y = calibrated_model_logits(2000)
    reliability_diagram([("calibrated", z, y)], tmp_path / "one.png")
    _check_png(tmp_path / "one.png")
    reliability_diagram([("calibrated", z, y), ("over", 3 * z, y), ("under", z / 3, y)], tmp_path / "sub" / "three.png", n_bins=10)
    _check_png(tmp_path / "sub" / "three.png")
    with pytest.raises(CqkdError):
        reliability_diagram([], tmp_path / "none.png")


def test_cqkd_plot_reliability(teacher: Path, student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["plot", "reliability", teacher, "--out", tmp_path / "t.png"]) == 0
    _check_png(tmp_path / "t.png")
    assert _cli(["plot", "reliability", teacher, student, "--out", tmp_path / "ts.png", "--labels", "teacher", "student"]) == 0
    _check_png(tmp_path / "ts.png")
    assert _cli(["plot", "reliability", teacher, student, "--out", tmp_path / "x.png", "--labels", "one"]) == 2
    assert _cli(["plot", "reliability", tmp_path / "nope", "--out", tmp_path / "y.png"]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_a_failing_plot_does_not_lose_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cqkd.train.fit
    from cqkd.core.config import RunConfig
    from cqkd.core.rundir import RunDir
    from cqkd.train.fit import save_outputs

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(cqkd.train.fit, "reliability_diagram", broken)
    run = RunDir(tmp_path / "run")
    cfg = RunConfig(dataset="synthetic")
    run.prepare(cfg)
    z, y = calibrated_model_logits(50)
    module = SimpleNamespace(test_results={"idx": torch.arange(50), "logits": z.float(), "labels": y},
                             model=torch.nn.Linear(2, 2), cfg=cfg)
    with pytest.warns(UserWarning, match="no fonts today"):
        save_outputs(run, module, {"top1": 0.5})
    assert run.is_finished and run.metrics() == {"top1": 0.5}
    assert run.weights_file.exists() and run.logits_file.exists()


def test_label_smoothing_gives_a_lower_fitted_t_cal(tmp_path: Path) -> None:
    """The conditions study's underconfident teacher: label smoothing 0.2 lowers the T_cal fitted on
    val against the same teacher (same data, seed and epochs) trained without it."""
    from conftest import TINY

    from cqkd.core.config import RunConfig
    from cqkd.train.fit import fit_run

    t_cal = {}
    for ls in (0.0, 0.2):
        # at 7 px two classes of a synthetic group look alike, so val accuracy stays near 50% and
        # T_cal is interior (at 28 px val accuracy is 100% and any T_cal fit runs to its bound)
        cfg = RunConfig.from_dict({**TINY, "model": "cnn-small", "size": 7, "epochs": 3, "train_samples": 1000,
                                   "lr": 3e-3, "label_smoothing": ls})
        fit_run(cfg, tmp_path / f"ls{ls}", progress=False)
        t_cal[ls] = calibrate_run(tmp_path / f"ls{ls}", progress=False)["t_cal"]
    assert t_cal[0.2] < t_cal[0.0], t_cal
    assert t_cal[0.2] < 1.0  # underconfident: the fitted temperature sharpens
