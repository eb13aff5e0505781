"""Cross-quality beyond resolution: JPEG in the degradation, corruptions, the shift evaluation,
mCE, the shift figure and deployment of JPEG-trained students."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from test_cache import N_TRAIN, distil_cfg, make_teacher_run, record_losses

from cqkd import cli
from cqkd.analysis.shift import compare_groups, corruption_errors, read_shift
from cqkd.core.config import RunConfig
from cqkd.data.registry import load_dataset
from cqkd.deploy import load_predictor
from cqkd.deploy.export import export_run, trained_on
from cqkd.errors import CqkdError
from cqkd.train import fit as training
from cqkd.train.fit import fit_run
from cqkd.views.corrupt import CORRUPTIONS, Corruption, parse_grid
from cqkd.views.degrade import Degradation, jpeg


def _pillow_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """An independent encode and decode with Pillow (its own libjpeg, default settings)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert(Image.open(buf).mode))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_dataset("synthetic", train_samples=64).train.images[:16]


# ------------------------------------------------------------------ JPEG in the degradation

@pytest.mark.parametrize("quality", [10, 25, 50, 90])
def test_jpeg_matches_an_independent_pillow_encode_within_one_grey_level(images, quality) -> None:
    ours = (jpeg(images.float() / 255, quality) * 255).round().to(torch.uint8)
    diffs, changed = [], []
    for i in range(len(images)):
        ref = _pillow_jpeg(images[i, 0].numpy(), quality).astype(np.float64)
        diffs.append(np.abs(ours[i, 0].numpy().astype(np.float64) - ref).mean())
        changed.append(np.abs(ref - images[i, 0].numpy()).mean())
    assert float(np.mean(diffs)) <= 1.0, diffs
    assert float(np.mean(changed)) > 0.5  # the compression does change the image, so the comparison means something


def test_jpeg_of_colour_images_matches_pillow(images) -> None:
    rgb = torch.cat([images[:4], images[4:8].flip(-1), images[8:12].flip(-2)], dim=1)  # (4, 3, 28, 28)
    ours = (jpeg(rgb.float() / 255, 30) * 255).round().to(torch.uint8)
    diffs = [np.abs(ours[i].permute(1, 2, 0).numpy().astype(float)
                    - _pillow_jpeg(rgb[i].permute(1, 2, 0).numpy(), 30).astype(float)).mean() for i in range(4)]
    assert float(np.mean(diffs)) <= 1.0, diffs


def test_jpeg_spec_parses_chains_and_stays_canonical() -> None:
    d = Degradation.parse("size=14,jpeg=25")
    assert d.jpeg_range == (25, 25) and not d.random and d.spec() == "size=14,jpeg=25"
    r = Degradation.parse("jpeg=10-50,size=28,blur=0.5")
    assert r.jpeg_range == (10, 50) and r.random and r.spec() == "size=28,blur=0.5,jpeg=10-50"
    assert Degradation.parse("size=7,jpeg=30-30").spec() == "size=7,jpeg=30"
    assert Degradation.parse("size=7").spec() == "size=7" and Degradation.parse("size=7").jpeg_range is None
    x = torch.rand(3, 1, 28, 28)
    assert d(x).shape == (3, 1, 14, 14)
    assert Degradation.parse("size=14,jpeg=25,upsample=true")(x).shape == (3, 1, 28, 28)
    with pytest.raises(CqkdError, match="1 or 3 channels"):
        jpeg(torch.rand(1, 2, 8, 8), 50)


def test_jpeg_comes_after_noise_and_leaves_the_noise_draws_unchanged(images) -> None:
    x = images.float() / 255
    noisy = Degradation.parse("size=14,noise=0.05")(x, torch.Generator().manual_seed(5))
    both = Degradation.parse("size=14,noise=0.05,jpeg=50")(x, torch.Generator().manual_seed(5))
    assert torch.equal(both, jpeg(noisy, 50))  # the fixed order resize -> blur -> noise -> jpeg


def test_jpeg_range_is_reproducible_from_the_seed_and_varies_across_images(images) -> None:
    x = images[:1].float().div(255).expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    d = Degradation.parse("size=28,jpeg=5-95")
    a = d(x, torch.Generator().manual_seed(3))
    b = d(x, torch.Generator().manual_seed(3))
    c = d(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) >= 8  # 16 draws from 91 qualities: the same image comes out differently
    # each image equals the fixed-quality JPEG at the quality drawn for it
    qualities = torch.randint(5, 96, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    for i in (0, 7, 15):
        assert torch.equal(a[i], jpeg(x[i : i + 1], qualities[i])[0])


def test_cache_stays_exact_with_a_jpeg_degradation(tmp_path, monkeypatch) -> None:
    """Cached and online teacher give the same loss at every step when the student's view is
    JPEG-compressed at a random quality: the teacher never sees the degraded view."""
    teacher = make_teacher_run(tmp_path / "teacher")
    records, mode = record_losses(monkeypatch)
    spec = "size=14,jpeg=10-50"
    m_off = training.fit_run(distil_cfg(teacher, teacher_cache="off", degradation=spec), tmp_path / "off",
                             progress=False)
    mode[0] = "auto"
    m_auto = training.fit_run(distil_cfg(teacher, teacher_cache="auto", degradation=spec), tmp_path / "auto",
                              progress=False)
    assert m_off["teacher_source"] == "online" and m_auto["teacher_source"] == "cache"
    assert m_auto["degradation"] == spec
    off, auto = records["off"], records["auto"]
    assert len(off) == len(auto) == N_TRAIN // 64
    for step, (a, b) in enumerate(zip(off, auto)):
        assert a[2] == b[2], f"step {step}: different batches"
        assert a[0] == pytest.approx(b[0], rel=1e-3, abs=1e-4), f"step {step}: loss {a[0]} vs {b[0]}"
        assert a[1] == pytest.approx(b[1], rel=1e-3, abs=1e-4), f"step {step}: KL {a[1]} vs {b[1]}"


# ------------------------------------------------------------------ corruptions

def test_corruptions_at_every_severity_are_deterministic_and_grow(images) -> None:
    x = images.float() / 255
    for name in CORRUPTIONS:
        dist = []
        for s in range(1, 6):
            c = Corruption(name, s)
            a = c(x, torch.Generator().manual_seed(1))
            assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
            assert torch.equal(a, c(x, torch.Generator().manual_seed(1)))
            dist.append(float((a - x).abs().mean()))
        assert dist[0] > 0 and dist[-1] > dist[0], (name, dist)  # severity 5 moves the image more than 1


def test_corruption_parameters_golden() -> None:
    # ImageNet-C's constants at severities 1 and 5; blur: CIFAR-10-C's sigma for 32 px
    assert Corruption("jpeg", 1).parameter == 25 and Corruption("jpeg", 5).parameter == 7
    assert Corruption("gaussian_noise", 5).parameter == 0.38 and Corruption("contrast", 1).parameter == 0.4
    assert Corruption("pixelate", 5).parameter == 0.25 and Corruption("gaussian_blur", 5).parameter == 1.0
    x = torch.zeros(1, 1, 4, 4)
    x[..., :2] = 1.0  # mean 0.5 per image: contrast c=0.4 gives 0.5 +- 0.5*0.4 = 0.7 / 0.3
    y = Corruption("contrast", 1)(x)
    assert torch.allclose(y[..., :2], torch.tensor(0.7)) and torch.allclose(y[..., 2:], torch.tensor(0.3))


def test_grid_file_validation() -> None:
    grid = parse_grid({"jpeg": [1, 5], "contrast": 3}, "f")
    assert [(c.name, c.severity) for c in grid] == [("jpeg", 1), ("jpeg", 5), ("contrast", 3)]
    for bad in ({"fog": [1]}, {"jpeg": [0]}, {"jpeg": [6]}, {"jpeg": "1"}, [], {"jpeg": [True]}):
        with pytest.raises(CqkdError):
            parse_grid(bad, "f")


def test_mce_golden() -> None:
    """CE_c = sum_s E_s / sum_s E^base_s: errors 0.2+0.4 against 0.4+0.8 -> 0.5; relative:
    (0.2-0.1)+(0.4-0.1) = 0.4 against (0.4-0.2)+(0.8-0.2) = 0.8 -> 0.5."""
    def rows(clean, e1, e5):
        return [{"corruption": "none", "severity": 0, "top1": 1 - clean},
                {"corruption": "jpeg", "severity": 1, "top1": 1 - e1}, {"corruption": "jpeg", "severity": 5, "top1": 1 - e5}]
    e = corruption_errors(rows(0.1, 0.2, 0.4), rows(0.2, 0.4, 0.8))
    assert e["jpeg"]["ce"] == pytest.approx(0.5) and e["jpeg"]["relative_ce"] == pytest.approx(0.5)
    assert e["mean"]["ce"] == pytest.approx(0.5)


# ------------------------------------------------------------------ shift evaluation end to end

@pytest.fixture(scope="module")
def jpeg_student(tmp_path_factory) -> Path:
    """A supervised 14 px student trained one epoch on JPEG views (quality drawn from 20-40)."""
    out = tmp_path_factory.mktemp("jpeg") / "student"
    fit_run(RunConfig.from_dict({**TINY, "model": "cnn-small", "degradation": "size=14,jpeg=20-40"}), out,
            progress=False)
    return out


def test_shift_writes_every_row_and_is_reproducible(tiny_teacher, jpeg_student, tmp_path, capsys) -> None:
    assert cli.main(["evaluate", str(tiny_teacher), str(jpeg_student), "--shift", "--baseline", str(tiny_teacher)]) == 0
    out = capsys.readouterr().out
    assert "shift evaluation of" in out and "mCE" in out
    for run in (tiny_teacher, jpeg_student):
        rows = read_shift(run)
        assert [(r["corruption"], r["severity"]) for r in rows] == [("none", 0)] + [
            (c, s) for c in CORRUPTIONS for s in range(1, 6)]
        assert all(r["n"] == 1000 and r["t_cal"] > 0 for r in rows)
        by = {(r["corruption"], r["severity"]): r for r in rows}
        assert by[("gaussian_noise", 5)]["top1"] <= by[("gaussian_noise", 1)]["top1"]
        mean_worst = np.mean([by[(c, 5)]["top1"] for c in CORRUPTIONS])
        mean_mild = np.mean([by[(c, 1)]["top1"] for c in CORRUPTIONS])
        assert mean_worst <= mean_mild
    with open(jpeg_student / "shift.csv", newline="") as f:
        assert next(csv.reader(f)) == ["corruption", "severity", "parameter", "n", "top1", "nll", "ece", "entropy",
                                       "t_cal", "nll_cal", "ece_cal", "entropy_cal"]
    first = (jpeg_student / "shift.csv").read_bytes()
    assert cli.main(["evaluate", str(jpeg_student), "--shift"]) == 0
    assert (jpeg_student / "shift.csv").read_bytes() == first  # the same run gives the same shift.csv
    # the teacher against itself: every CE is exactly 1
    e = corruption_errors(read_shift(tiny_teacher), read_shift(tiny_teacher))
    assert all(v["ce"] == pytest.approx(1.0) for v in e.values())
    grid = tmp_path / "grid.yaml"
    grid.write_text("jpeg: [1, 5]\ncontrast: [3]\n")
    assert cli.main(["evaluate", str(jpeg_student), "--shift", str(grid)]) == 0
    rows = read_shift(jpeg_student)
    assert [(r["corruption"], r["severity"]) for r in rows] == [("none", 0), ("jpeg", 1), ("jpeg", 5), ("contrast", 3)]
    fig = tmp_path / "shift.png"
    assert cli.main(["plot", "shift", str(tiny_teacher), str(jpeg_student), "--out", str(fig)]) == 0
    assert fig.stat().st_size > 1000 and fig.read_bytes()[:4] == b"\x89PNG"
    table = compare_groups({"teacher": [str(tiny_teacher)], "student": [str(jpeg_student)]}, "teacher")
    row = next(r for r in table if r["corruption"] == "jpeg" and r["severity"] == 5 and r["metric"] == "top1")
    assert row["student-teacher"] == pytest.approx(row["student"] - row["teacher"]) and row["student seeds"] == 1


def _one_line_exit_2(argv: list[str], capsys) -> str:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("cqkd: error: "), err
    return err


@pytest.mark.parametrize("spec,needle", [("size=7,jpeg=0", "[1, 100]"), ("size=7,jpeg=101", "[1, 100]"),
                                         ("size=7,jpeg=50-10", "LO <= HI"), ("size=7,jpeg=q", "'jpeg'")])
def test_bad_jpeg_spec_is_one_line_and_exit_2(spec, needle, tmp_path, capsys) -> None:
    err = _one_line_exit_2(["train", "--dataset", "synthetic", "--degradation", spec, "--out", str(tmp_path / "r")],
                           capsys)
    assert needle in err


@pytest.mark.parametrize("grid,needle", [("fog: [1]", "unknown corruption 'fog'"), ("jpeg: [6]", "out of range"),
                                         ("jpeg: [0]", "out of range")])
def test_bad_shift_grid_is_one_line_and_exit_2(grid, needle, tiny_teacher, tmp_path, capsys) -> None:
    f = tmp_path / "grid.yaml"
    f.write_text(grid + "\n")
    assert needle in _one_line_exit_2(["evaluate", str(tiny_teacher), "--shift", str(f)], capsys)


def test_baseline_without_shift_is_one_line(tiny_teacher, capsys) -> None:
    _one_line_exit_2(["evaluate", str(tiny_teacher), "--baseline", str(tiny_teacher)], capsys)


# ------------------------------------------------------------------ deployment

def test_deployment_does_not_compress_again_and_refuses_a_random_jpeg_export(jpeg_student, tmp_path) -> None:
    predictor = load_predictor(jpeg_student)
    assert predictor.degradation.jpeg == "" and predictor.degradation.size == 14
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    ref = torch.nn.functional.interpolate(x.float() / 255, size=(14, 14), mode="bilinear", antialias=True,
                                          align_corners=False)
    assert torch.allclose(predictor.preprocess(x), predictor.normalize(ref))  # resize only: no JPEG
    with pytest.raises(CqkdError, match="random"):
        export_run(jpeg_student, "torchscript", tmp_path / "m.pt", with_preprocessing=True)
    assert not (tmp_path / "m.pt").exists()
    assert "JPEG-compressed at a quality drawn per image from 20-40" in trained_on("size=14,jpeg=20-40")
    assert "quality 25" in trained_on("size=28,jpeg=25") and "JPEG" not in trained_on("size=7")


def test_model_card_says_what_the_student_was_trained_on(jpeg_student, tmp_path) -> None:
    done = export_run(jpeg_student, "torchscript", tmp_path / "m.pt", parity_samples=64)
    card = json.loads(done.card_path.read_text())
    assert card["degradation"] == "size=14,jpeg=20-40" and card["degradation_applied"] == "size=14"
    assert "JPEG" in card["trained_on"]



# ------------------------------------------------------------------ the quality study and its report

def test_findings_pair_each_jpeg_quality_with_its_own_supervised_baseline(tmp_path) -> None:
    """Two JPEG qualities at one size: CQKD beats supervised by exactly 0.05 within each quality
    (0.65 vs 0.60 at q10, 0.75 vs 0.70 at q25); pairing across qualities would give -0.05 or +0.15."""
    from test_sweep import _row

    from cqkd.analysis.findings import condition_of, distill_series, findings
    from cqkd.analysis.report import size_table

    rows = []
    for seed in range(3):
        for q, sup, kd in ((10, 0.60, 0.65), (25, 0.70, 0.75)):
            spec = f"size=28,jpeg={q}"
            rows.append(_row(tmp_path, "supervised", 28, seed, sup, 0.7, degradation=spec))
            for t in (1.0, 4.0):
                rows.append(_row(tmp_path, "distill", 28, seed, kd, 0.7, degradation=spec, temperature=t,
                                 temperature_used=t))
    series = distill_series(rows)
    assert sorted(s.condition for s in series) == ["size=28,jpeg=10", "size=28,jpeg=25"]
    f1 = [f for f in findings(rows) if f["finding"] == 1 and "best by val" in f["what"]]
    assert len(f1) == 2 and all(f["estimate"] == pytest.approx(0.05) for f in f1), f1
    sup_rows = [e for e in size_table(rows) if e["method"].startswith("supervised")]
    assert [e["method"] for e in sup_rows] == ["supervised [size=28,jpeg=10]", "supervised [size=28,jpeg=25]"]
    assert [e["top1"][0] for e in sup_rows] == [pytest.approx(0.60), pytest.approx(0.70)]
    assert condition_of({"size": 7, "degradation": None}) == "size=7"


def test_quality_config_plans_the_matched_design() -> None:
    from cqkd.sweep.plan import load_sweep

    root = Path(__file__).parent.parent / "configs"
    plan = load_sweep(root / "fashion-mnist-quality.yaml", "runs/quality")
    main = {r.name: r for r in load_sweep(root / "fashion-mnist-study.yaml", "runs/quality").runs}
    specs = [(r.group, r.cfg.degradation_spec().spec()) for r in plan.runs]
    assert len(plan.runs) == 86
    for spec in ("size=28,jpeg=10", "size=28,jpeg=25", "size=14,jpeg=25"):
        assert specs.count(("supervised", spec)) == 5 and specs.count(("distill", spec)) == 2 * 2 * 5
    assert specs.count(("supervised", "size=7")) == 5 and specs.count(("distill", "size=7")) == 5
    shared = [r for r in plan.runs if r.name in main]
    assert len(shared) == 1 + 5 + 5  # the teacher, the 7 px supervised and CQKD T=1 students
    assert all(r.cfg.digest() == main[r.name].cfg.digest() for r in shared)
    assert {r.cfg.train_samples for r in plan.runs} == {20000} and {r.cfg.epochs for r in plan.runs} == {6}
    assert {r.cfg.seed for r in plan.runs if r.group != "teachers"} == set(range(5))
