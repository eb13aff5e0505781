"""Using a trained run: cqkd predict on image files, the Python API, ONNX / TorchScript exports."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, cli_env, cqkd_cmd
from PIL import Image

from cqkd import cli
from cqkd.core.config import RunConfig
from cqkd.core.io import file_sha256
from cqkd.core.rundir import RunDir
from cqkd.deploy import export as export_mod
from cqkd.deploy import find_images, load_predictor, predict_files
from cqkd.deploy.export import export_onnx, export_run, export_torchscript, onnx_session
from cqkd.deploy.images import to_channels
from cqkd.deploy.predictor import Predictor
from cqkd.errors import CqkdError
from cqkd.nets.registry import build_model
from cqkd.train.calibrate import calibrate_run
from cqkd.train.fit import fit_run
from cqkd.train.setup import load_splits
from cqkd.views.degrade import Degradation

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


@pytest.fixture(scope="module")
def student(tiny_teacher: Path, tmp_path_factory) -> Path:
    """A cnn-small student distilled from the tiny teacher at 7 px, calibrated on val."""
    out = tmp_path_factory.mktemp("student") / "student"
    cfg = RunConfig.from_dict({**TINY, "kind": "distill", "teacher": str(tiny_teacher), "model": "cnn-small", "size": 7})
    fit_run(cfg, out, progress=False)
    calibrate_run(out, progress=False)
    return out


def split_images(run: Path) -> torch.Tensor:
    """The run's test split: uint8 (N, C, S, S), in the order of its saved test logits."""
    return load_splits(RunDir(run).config()).test.images


def write_lossless(images: torch.Tensor, root: Path) -> dict[str, int]:
    """Each test image as a lossless file under ``root``, in four forms (grey PNG, RGB PNG, grey +
    alpha PNG, grey PNG padded to 28x40 whose centre crop is the image); {path: test index}."""
    index = {}
    for i, img in enumerate(images[:, 0].numpy()):
        form = i % 4
        d = root / f"form{form}"
        d.mkdir(parents=True, exist_ok=True)
        if form == 0:
            im = Image.fromarray(img)
        elif form == 1:
            im = Image.fromarray(img).convert("RGB")
        elif form == 2:
            im = Image.fromarray(np.stack([img, np.full_like(img, 200)], -1), mode="LA")
        else:
            im = Image.fromarray(np.pad(img, ((0, 0), (6, 6))))
        path = d / f"{i:04d}.png"
        im.save(path)
        index[str(path)] = i
    return index


@pytest.fixture(scope="module")
def png_folder(student: Path, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("pngs")
    return root, write_lossless(split_images(student), root)


# ------------------------------------------------------------------------------ predict: exactness

@pytest.mark.parametrize("which", ["teacher", "student"])
def test_predict_on_png_files_reproduces_the_evaluation_logits(which, tiny_teacher, student, png_folder) -> None:
    """The run's own test images written as PNG (grey, RGB, grey+alpha, padded to another size):
    predict gives evaluate's top-1 on every image, and its logits."""
    run = tiny_teacher if which == "teacher" else student
    root, index = png_folder
    saved = RunDir(run).test_logits()
    result = predict_files(load_predictor(run), [root], batch_size=100)
    assert sorted(result.paths) == sorted(index)
    order = torch.tensor([index[p] for p in result.paths])
    assert torch.equal(result.predictions.probs.argmax(-1), saved["logits"][order].argmax(-1))
    assert (result.predictions.logits - saved["logits"][order]).abs().max() <= 1e-4


def test_calibrated_probabilities_are_softmax_of_logits_over_t_cal(student, png_folder) -> None:
    root, index = png_folder
    t_cal = json.loads((student / "calibration.json").read_text())["t_cal"]
    saved = RunDir(student).test_logits()["logits"]
    result = predict_files(load_predictor(student), [root])
    order = torch.tensor([index[p] for p in result.paths])
    assert result.predictions.t_cal == t_cal
    expected = F.softmax(saved[order].double() / t_cal, -1).float()
    assert torch.allclose(result.predictions.probs, expected, atol=1e-5)
    plain = predict_files(load_predictor(student), [root], calibrated=False).predictions
    assert plain.t_cal is None and torch.allclose(plain.probs, F.softmax(saved[order], -1), atol=1e-5)
    assert load_predictor(student, calibration=False).t_cal is None


def test_calibration_fitted_for_other_weights_is_refused(student, tmp_path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(student, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
    data = json.loads((run / "calibration.json").read_text())
    (run / "calibration.json").write_text(json.dumps({**data, "weights_digest": "0" * 16}))
    with pytest.raises(CqkdError, match="other weights"):
        load_predictor(run)
    assert load_predictor(run, calibration=False).t_cal is None


def make_imagefolder(root: Path, classes: int = 3, train: int = 6, val: int = 3) -> Path:
    """DIR/train/<class>/, DIR/val/<class>/: colour PNGs and JPEGs of varying shapes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((40 + 3 * i, 36 + 5 * (i % 3), 3)) * 80).astype(np.uint8)
                a[..., c] += 150
                Image.fromarray(a).save(d / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_predict_on_an_image_folder_run_uses_its_evaluation_crop(tmp_path) -> None:
    """An image-folder run: its test files (any shape, PNG and JPEG) through predict give exactly
    the saved test logits (decoded, resized and centre-cropped as the evaluation loader does)."""
    data = make_imagefolder(tmp_path / "data")
    run = tmp_path / "run"
    fit_run(RunConfig.from_dict(dict(dataset="imagefolder", data_dir=str(data), crop_size=24, size=8, val_size=3,
                                     epochs=1, batch_size=6, model="cnn-small", accelerator="cpu")), run, progress=False)
    saved = RunDir(run).test_logits()["logits"]
    result = predict_files(load_predictor(run), [data / "val"])
    assert result.paths == [str(p) for p in sorted((data / "val").rglob("*.*"))]
    assert (result.predictions.logits - saved).abs().max() <= 1e-5
    assert torch.equal(result.predictions.logits.argmax(-1), saved.argmax(-1))


# ------------------------------------------------------------------------------ predict: the CLI and the API

def test_cqkd_predict_on_mixed_files(student, tmp_path, capsys) -> None:
    """PNGs and JPEGs of mixed sizes, grey and colour, in nested directories: one row per image
    with the top-k names and probabilities; rows equal the API's predictions of the same files."""
    images = split_images(student)[:12, 0].numpy()
    shapes = [(28, 28), (56, 56), (30, 41), (100, 64), (9, 9), (28, 60)]
    for i, img in enumerate(images):
        im = Image.fromarray(img).resize(shapes[i % len(shapes)][::-1], Image.BILINEAR)
        im = im.convert("RGB") if i % 3 else im
        sub = tmp_path / "in" / ("jpg" if i % 2 else "png") / ("deep" if i > 6 else "")
        sub.mkdir(parents=True, exist_ok=True)
        im.save(sub / f"{i}.{'jpg' if i % 2 else 'png'}", **({"quality": 90} if i % 2 else {}))
    (tmp_path / "in" / "notes.txt").write_text("not an image, and not an image extension: ignored")
    out = tmp_path / "preds.csv"
    rc = cli.main(["predict", str(student), str(tmp_path / "in"), "--out", str(out), "--top-k", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and len(err) == 1
    t_cal = json.loads((student / "calibration.json").read_text())["t_cal"]
    assert f"T_cal = {t_cal:.4g}" in err[0] and "predicted 12 image(s)" in err[0]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    predictor = load_predictor(student)
    api = predictor.predict([r["path"] for r in rows]).top(3)
    for row, expected in zip(rows, api):
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [name for name, _ in expected]
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx([p for _, p in expected], abs=1e-6)
    # refuses to overwrite without --force; jsonl with --force
    assert cli.main(["predict", str(student), str(tmp_path / "in"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["predict", str(student), str(tmp_path / "in"), "--out", str(out), "--force",
                     "--format", "jsonl", "--top-k", "20", "--no-calibration"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and len(records[0]["classes"]) == 10 and sum(records[0]["probs"]) == pytest.approx(1, abs=1e-4)
    assert "uncalibrated" in capsys.readouterr().err


def test_predict_api_reads_tensors_pil_images_and_paths_alike(student, tmp_path) -> None:
    predictor = load_predictor(student)
    img = split_images(student)[0]  # uint8 (1, 28, 28)
    path = tmp_path / "x.png"
    Image.fromarray(img[0].numpy()).save(path)
    expected = predictor(img.unsqueeze(0))
    variants = [img, img[0], img.float() / 255, img.unsqueeze(0), img.expand(3, -1, -1),
                Image.fromarray(img[0].numpy()), Image.fromarray(img[0].numpy()).convert("RGB"), str(path), path]
    for v in variants:
        assert torch.allclose(predictor.logits(v), expected, atol=1e-6), type(v)
    assert len(predictor.predict(variants).labels()) == len(variants)
    assert predictor.predict(img).top(3)[0][0][0] in predictor.classes
    with pytest.raises(CqkdError, match=r"\[0, 1\]"):
        predictor.predict(img.float())  # 0-255 floats
    with pytest.raises(CqkdError, match="shape"):
        predictor.predict(torch.zeros(2, 5, 28, 28, dtype=torch.uint8))
    with pytest.raises(CqkdError, match="directory"):
        predictor.predict(tmp_path)


def test_channel_conversion_is_pils() -> None:
    """RGB to grey is PIL's convert("L") (BT.601 luma, fixed point); grey survives RGB and back."""
    rgb = np.random.default_rng(0).integers(0, 256, (17, 19, 3), dtype=np.uint8)
    grey = to_channels(torch.from_numpy(rgb).permute(2, 0, 1), 1)[0].numpy()
    assert np.array_equal(grey, np.asarray(Image.fromarray(rgb).convert("L")))
    g = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    assert torch.equal(to_channels(to_channels(g, 3), 1), g)
    assert to_channels(torch.zeros(4, 5, 5), 3).shape == (3, 5, 5)  # RGBA: alpha dropped


def test_find_images(tmp_path) -> None:
    for name in ("b/2.PNG", "a.jpg", ".hidden/3.png", "b/.4.png", "c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path, tmp_path / "a.jpg"])] == ["a.jpg", "b/2.PNG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CqkdError, match="no image files"):
        find_images([tmp_path / "empty"])
    with pytest.raises(CqkdError, match="does not exist"):
        find_images([tmp_path / "nope.png"])


# ------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def bad_inputs(student, tmp_path_factory) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("bad")
    (d / "noweights").mkdir()
    (d / "noweights" / "config.yaml").write_text((student / "config.yaml").read_text())
    (d / "empty").mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "notes.xyz").write_text("not an image")
    good = d / "good"
    good.mkdir()
    Image.fromarray(split_images(student)[0, 0].numpy()).save(good / "ok.png")
    s = str(student)
    return {
        "missing run": ["predict", str(d / "no-such-run"), str(good)],
        "run without weights": ["predict", str(d / "noweights"), str(good)],
        "export of a run without weights": ["export", str(d / "noweights"), "--format", "torchscript"],
        "unreadable image": ["predict", s, str(good), str(d / "broken.png")],
        "unknown image format": ["predict", s, str(d / "notes.xyz")],
        "empty directory": ["predict", s, str(d / "empty")],
        "unknown output format": ["predict", s, str(good), "--format", "xml"],
        "unknown export format": ["export", s, "--format", "tflite"],
        "missing input": ["predict", s, str(d / "nope.png")],
    }


@pytest.mark.parametrize("case", ["missing run", "run without weights", "export of a run without weights",
                                  "unreadable image", "unknown image format", "empty directory",
                                  "unknown output format", "unknown export format", "missing input"])
def test_bad_input_is_one_line_and_exit_2(case, bad_inputs, capsys) -> None:
    rc = cli.main(bad_inputs[case])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cqkd: error: "), err


def test_cqkd_predict_process_exit_codes(student, bad_inputs, tmp_path) -> None:
    """In a real process: an unreadable file is one line and exit 2 (nothing on stdout); with
    --skip-bad-images the rest is predicted to stdout and the exit status is 3."""
    args = bad_inputs["unreadable image"][1:]
    r = subprocess.run(cqkd_cmd("predict", *args), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.count("\n") == 1 and "broken.png" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cqkd_cmd("predict", *args, "--skip-bad-images", "--top-k", "1"), capture_output=True,
                       text=True, env=cli_env(), timeout=300)
    assert r.returncode == 3, r.stderr
    assert r.stdout.splitlines()[0] == "path,class_1,prob_1" and len(r.stdout.splitlines()) == 2
    assert r.stderr.count("\n") == 1 and "skipped 1 unreadable file(s)" in r.stderr and "broken.png" in r.stderr


# ------------------------------------------------------------------------------ export

def test_onnx_export_round_trip_and_card(student, tmp_path) -> None:
    done = export_run(student, "onnx", tmp_path / "student.onnx")
    assert done.path == tmp_path / "student.onnx" and done.card_path == tmp_path / "student.card.json"
    card = json.loads(done.card_path.read_text())
    predictor = load_predictor(student)
    assert card["classes"] == list(predictor.classes) and card["mean"] == list(predictor.mean)
    assert card["t_cal"] == json.loads((student / "calibration.json").read_text())["t_cal"]
    assert card["weights_sha256"] == file_sha256(student / "model.safetensors")
    assert card["file_sha256"] == file_sha256(done.path)
    assert (card["image_size"], card["input_size"], card["channels"], card["degradation"]) == (28, 7, 1, "size=7")
    assert card["parity"]["n"] == 1000 and card["parity"]["top1_agreement"] == 1.0
    assert card["parity"]["max_abs_logit_diff"] <= 1e-4
    import onnx

    dim = onnx.load(str(done.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # a dynamic batch
    session = onnx_session(done.path)
    x = predictor.preprocess(split_images(student)[:300])
    for n in (1, 3, 300):
        got = torch.from_numpy(session.run(None, {"input": x[:n].numpy()})[0])
        ref = predictor.model(x[:n]).detach()
        assert torch.equal(got.argmax(-1), ref.argmax(-1)) and (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("with_preprocessing", [False, True])
def test_torchscript_export_round_trip(student, tmp_path, with_preprocessing) -> None:
    done = export_run(student, "torchscript", tmp_path / "m.torchscript.pt", with_preprocessing=with_preprocessing)
    assert done.card_path.name == "m.torchscript.card.json"
    loaded = torch.jit.load(str(done.path))
    predictor = load_predictor(student)
    images = split_images(student)[:200]
    with torch.no_grad():
        if with_preprocessing:
            got, ref = loaded(images), predictor(images)
        else:
            x = predictor.preprocess(images)
            got, ref = loaded(x), predictor.model(x)
    assert torch.equal(got.argmax(-1), ref.argmax(-1)) and (got - ref).abs().max() <= 1e-4


def test_onnx_with_preprocessing_takes_uint8_and_agrees_with_predict(student, png_folder, tmp_path) -> None:
    """The graph takes uint8 full-size images; its top-1 equals predict's on the same images as files."""
    done = export_run(student, "onnx", tmp_path / "pre.onnx", with_preprocessing=True)
    card = json.loads(done.card_path.read_text())
    assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == ["batch", 1, 28, 28]
    root, index = png_folder
    files = predict_files(load_predictor(student), [root])
    order = torch.tensor([index[p] for p in files.paths])
    session = onnx_session(done.path)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    got = torch.from_numpy(session.run(None, {"images": split_images(student)[order].numpy()})[0])
    assert torch.equal(got.argmax(-1), files.predictions.probs.argmax(-1))
    assert (got - files.predictions.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("spec", ["size=7,mode=bicubic,blur=0.5", "size=9,mode=area,upsample=true",
                                  "size=11,antialias=false", "size=12,mode=nearest"])
def test_preprocessing_graph_matches_pytorch_for_other_degradations(spec, tmp_path) -> None:
    """The degradation inside the ONNX and TorchScript graphs (ONNX Resize with antialias, opset 20)
    against PyTorch's own, for resize modes, blur and upsampling (random weights and images)."""
    deg = Degradation.parse(spec)
    torch.manual_seed(0)
    model = build_model("cnn-small", 10, 3, deg.output_size(28))
    predictor = Predictor(model, deg, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), [str(i) for i in range(10)], 28, 3)
    x = torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        ref = predictor(x)
    export_onnx(predictor, x[:2], tmp_path / "p.onnx")
    got = torch.from_numpy(onnx_session(tmp_path / "p.onnx").run(None, {"images": x.numpy()})[0])
    assert torch.equal(got.argmax(-1), ref.argmax(-1)) and (got - ref).abs().max() <= 1e-4
    export_torchscript(predictor, x[:2], tmp_path / "p.pt")
    with torch.no_grad():
        assert (torch.jit.load(str(tmp_path / "p.pt"))(x) - ref).abs().max() <= 1e-5


def test_failed_parity_is_one_line_exit_1_and_leaves_nothing(student, tmp_path, monkeypatch, capsys) -> None:
    real = export_mod._runner

    def off_by_a_little(fmt, path):
        run, name = real(fmt, path)
        return (lambda x: run(x) + 2e-4), name

    monkeypatch.setattr(export_mod, "_runner", off_by_a_little)
    out = tmp_path / "out" / "m.onnx"
    rc = cli.main(["export", str(student), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "does not reproduce" in err, err
    assert list((tmp_path / "out").iterdir()) == []
    # refuses to overwrite an export without --force
    monkeypatch.setattr(export_mod, "_runner", real)
    assert cli.main(["export", str(student), "--format", "torchscript", "--out", str(out),
                     "--parity-samples", "50"]) == 0
    assert "50 test images" in capsys.readouterr().out
    assert cli.main(["export", str(student), "--format", "torchscript", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the README example

def test_readme_python_example_runs(student, tmp_path, monkeypatch, capsys) -> None:
    """The Python block after the README's test marker runs as written, against a tiny run
    linked at the path it names and with the image files it names."""
    text = README.read_text()
    marker = text.index("<!-- tested by tests/test_deploy.py -->")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    run_path = re.search(r'load_predictor\("([^"]+)"\)', code).group(1)
    (tmp_path / run_path).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(student, tmp_path / run_path)
    img = split_images(student)[0, 0].numpy()
    for name in re.findall(r'"([\w./-]+\.(?:png|jpg))"', code):
        Image.fromarray(img).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "class-" in printed
