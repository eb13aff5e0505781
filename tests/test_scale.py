"""Large scale: image folders, CIFAR on disk, torchvision/timm models and teachers, weights
files, pretrained weights offline, two-process DDP, mixed precision, the benchmark scripts."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cqkd.calibration.metrics import all_metrics
from cqkd.core.config import RunConfig
from cqkd.data.registry import DatasetInfo, load_dataset
from cqkd.errors import CqkdError
from cqkd.nets.registry import build_model
from cqkd.nets.teacher import Teacher, load_teacher
from cqkd.train.fit import evaluate_run, fit_run
from cqkd.train.module import CQKDModule
from cqkd.train.setup import make_trainer

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run([sys.executable, "-m", "cqkd", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def make_folder(root: Path, classes: int = 3, per_class: int = 6, val_per_class: int = 2, size: int = 48) -> Path:
    """DIR/train/<class>/ and DIR/val/<class>/ with JPEG and PNG images of varying shapes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size - 8 + 4 * (i % 4), 3)) * 80).astype(np.uint8)
                a[..., c % 3] += 150
                Image.fromarray(a).save(d / f"img{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


def tiny_cfg(**kw) -> RunConfig:
    base = dict(dataset="imagefolder", crop_size=32, size=16, val_size=3, epochs=1, batch_size=4,
                model="cnn-small", accelerator="cpu")
    return RunConfig.from_dict({**base, **kw})


# ------------------------------------------------------------------------------ DDP

def test_ddp_two_processes_metrics_match_saved_logits(tmp_path):
    """Two gloo processes on CPU: metrics.json equals the metrics recomputed from the saved
    test logits, every test sample appears once and in order, and only rank 0 wrote files."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = build_model("cnn-large", 10, 1, 28)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    out = tmp_path / "ddp"
    r = run_cli("distill", "--dataset", "synthetic", "--model", "cnn-small", "--size", "14",
                "--teacher", str(tmp_path / "teacher.safetensors"), "--teacher-model", "cnn-large",
                "--temperature", "4", "--train-samples", "400", "--epochs", "1", "--batch-size", "100",
                "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    saved = torch.load(out / "test_logits.pt", weights_only=True)
    expected_labels = load_dataset("synthetic").test.labels
    assert metrics["world_size"] == 2
    assert metrics["n"] == len(expected_labels) == len(saved["labels"])  # none dropped or duplicated
    assert torch.equal(saved["labels"], expected_labels)  # in sample order
    recomputed = all_metrics(saved["logits"], saved["labels"], metrics["ece_bins"])
    for key, value in recomputed.items():
        assert math.isclose(metrics[key], value, rel_tol=1e-9, abs_tol=1e-12), key
    teacher_again = all_metrics(saved["teacher_logits"], saved["labels"])
    assert math.isclose(metrics["teacher_metrics"]["top1"], teacher_again["top1"])
    single = evaluate_run(out, progress=False)  # one process, from the saved weights
    assert single["n"] == metrics["n"] and math.isclose(single["nll"], metrics["nll"], rel_tol=1e-6)
    assert single["top1"] == metrics["top1"]
    # rank 0 wrote the run directory alone: exactly one set of files, no per-rank copies
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    allowed = {".cqkd-run.json", ".cqkd.lock", "config.yaml", "status.json", "metrics.json", "test_logits.pt", "model.safetensors",
               "metrics.csv", "hparams.yaml", "reliability.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    assert set(files) <= allowed, files
    assert {"config.yaml", "metrics.json", "test_logits.pt", "model.safetensors"} <= set(files)
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


# ------------------------------------------------------------------------------ image folders

def test_imagefolder_splits_and_views(folder):
    splits = load_dataset("imagefolder", folder, val_size=3, crop_size=32)
    info = splits.info
    assert (info.num_classes, info.channels, info.image_size, info.loader_augments) == (3, 3, 32, True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 3, 6)
    again = load_dataset("imagefolder", folder, val_size=3, crop_size=32)
    assert splits.val.paths == again.val.paths  # fixed-seed hold-out
    assert not set(splits.val.paths) & set(splits.train.paths)
    x, y, idx = next(iter(splits.train.loader(4, shuffle=True)))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    t1, _, _ = next(iter(splits.test.loader(6, shuffle=False)))
    t2, _, i2 = next(iter(splits.test.loader(6, shuffle=False)))
    assert torch.equal(t1, t2) and i2.tolist() == list(range(6))  # evaluation crop is deterministic
    sub = load_dataset("imagefolder", folder, train_samples=6, val_size=3, crop_size=32)
    assert len(sub.train) == 6 and sorted(sub.train.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_trains_and_evaluates(folder, tmp_path):
    out = tmp_path / "run"
    metrics = fit_run(tiny_cfg(data_dir=str(folder), epochs=2, num_workers=2), out, progress=False)
    assert metrics["n"] == 6 and metrics["dataset"] == "imagefolder"
    assert metrics["train_views"] == "random-resized-crop=32,flip"
    assert metrics["eval_views"] == "resize=37,center-crop=32"
    again = evaluate_run(out, progress=False)
    assert again["top1"] == metrics["top1"] and math.isclose(again["nll"], metrics["nll"], rel_tol=1e-6)


def test_imagefolder_module_applies_no_batch_views(folder):
    splits = load_dataset("imagefolder", folder, val_size=3, crop_size=32)
    module = CQKDModule(build_model("cnn-small", 3, 3, 16), tiny_cfg(data_dir=str(folder)), splits.info)
    assert module.views.is_identity
    # fresh crops (views_per_image all, the default for image folders): no bank, nothing to cache,
    # the teacher runs online on the loader's crops
    teacher = Teacher(build_model("cnn-small", 3, 3, 32).eval(), "unused", "cnn-small", 32,
                      splits.info.mean, splits.info.std)
    cfg = tiny_cfg(data_dir=str(folder), kind="distill", teacher="unused", teacher_cache="auto")
    assert cfg.views_per_image == "all"
    module = CQKDModule(build_model("cnn-small", 3, 3, 16), cfg, splits.info, teacher, train_data=splits.train)
    assert module.source.bank is None and not module.source.use_cache and module.views.is_identity


def test_broken_image_fails_naming_it_and_is_skipped_on_request(folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    bad = data / "train" / "class0001" / "broken.jpg"
    bad.write_text("this is not an image\n")
    r = run_cli("train", "--dataset", "imagefolder", "--data-dir", str(data), "--crop-size", "32", "--size", "16",
                "--val-size", "3", "--epochs", "1", "--batch-size", "4", "--accelerator", "cpu",
                "--num-workers", "1", "--out", str(tmp_path / "fail"), "--quiet")
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("cqkd: error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "--skip-bad-images" in errors[0]
    assert "Traceback" not in r.stderr
    metrics = fit_run(tiny_cfg(data_dir=str(data), skip_bad_images=True, epochs=2), tmp_path / "skip", progress=False)
    assert metrics["skipped_images"] == 1 and metrics["skipped_files"] == [str(bad)]


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(CqkdError, match="no image files"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(CqkdError, match="needs --data-dir"):
        load_dataset("imagefolder")


# ------------------------------------------------------------------------------ CIFAR on disk

def write_fake_cifar(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> dict:
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n).tolist())}

    for name, n in (("data_batch_1", n_train // 2), ("data_batch_2", n_train - n_train // 2), ("test_batch", n_test)):
        with open(d / name, "wb") as f:
            pickle.dump(batch(n), f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    return root


def test_cifar10_from_disk(tmp_path):
    root = write_fake_cifar(tmp_path)
    splits = load_dataset("cifar10", root, val_size=8)
    assert splits.train.images.shape == (32, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert len(splits.val) == 8 and len(splits.test) == 20 and splits.info.classes[3] == "c3"
    assert all(0.45 < m < 0.55 for m in splits.info.mean)  # uniform random pixels
    metrics = fit_run(RunConfig.from_dict(dict(dataset="cifar10", data_dir=str(root), val_size=8, size=16,
                                               epochs=1, batch_size=16, accelerator="cpu")),
                      tmp_path / "run", progress=False)
    assert metrics["n"] == 20
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:  # a pickle that would run code
        pickle.dump({b"data": os.system}, f)
    with pytest.raises(CqkdError, match="not allowed|corrupt"):
        load_dataset("cifar10", root, val_size=8)
    with pytest.raises(CqkdError, match="cifar-100-python"):
        load_dataset("cifar100", root)


def test_cifar100_from_disk(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 30), ("test", 12)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [i % 100 for i in range(n)]}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f, protocol=2)
    splits = load_dataset("cifar100", tmp_path, val_size=5)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 12)
    assert splits.info.num_classes == 100 and splits.info.classes[42] == "f42"
    assert splits.test.labels.tolist() == list(range(12))


# ------------------------------------------------------------------------------ models and teachers

IMAGENET = DatasetInfo("imagefolder", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                       loader_augments=True)


def one_step(module: CQKDModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    module.train()
    loss = module.training_step((x, y, torch.arange(len(y))), 0)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_resnet50_teacher_224_to_resnet18_student_56_one_step():
    torch.manual_seed(0)
    teacher_net = build_model("resnet50", 1000, 3, 224)
    teacher = Teacher(teacher_net.eval().requires_grad_(False), "random", "resnet50", 224, IMAGENET.mean, IMAGENET.std)
    before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    cfg = RunConfig.from_dict(dict(kind="distill", dataset="imagefolder", model="resnet18", size=56, teacher="x",
                                   temperature=10.0, alpha=0.5))
    module = CQKDModule(build_model("resnet18", 1000, 3, 56), cfg, IMAGENET, teacher)
    student_before = [p.detach().clone() for p in module.model.parameters()]
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    loss = one_step(module, x, torch.tensor([3, 999]))
    assert torch.isfinite(loss)
    assert module.teacher.training is False
    assert all(torch.equal(v, teacher_net.state_dict()[k]) for k, v in before.items())  # frozen (BN stats too)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.model.parameters()))
    assert module.student_forward(x.float() / 255).shape == (2, 1000)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
@pytest.mark.parametrize("name", ["timm:resnet10t", "mobilenet_v3_small"])
def test_timm_and_torchvision_names_resolve_and_train_a_step(name):
    info = load_dataset("synthetic").info
    cfg = RunConfig.from_dict(dict(dataset="synthetic", model=name, size=28))
    torch.manual_seed(0)
    module = CQKDModule(build_model(name, 10, 1, 28), cfg, info)
    before = [p.detach().clone() for p in module.model.parameters()]
    loss = one_step(module, torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "ckpt"])
def test_teacher_from_weights_file(fmt, tmp_path):
    from safetensors.torch import save_file

    info = load_dataset("synthetic").info
    torch.manual_seed(1)
    net = build_model("cnn-large", 10, 1, 28)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"teacher.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt":
        torch.save(state, path)
    else:  # a checkpoint-like dict with a prefixed state dict
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    teacher = load_teacher(str(path), info, "cnn-large")
    assert teacher.input_size == 28 and teacher.mean == info.mean and not teacher.model.training
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(CqkdError, match="--teacher-model"):
        load_teacher(str(path), info)
    with pytest.raises(CqkdError, match="does not fit"):
        load_teacher(str(path), info, "cnn-small")


def test_teacher_file_refuses_pickled_code_and_distills(tmp_path):
    info = load_dataset("synthetic").info
    torch.save(build_model("cnn-small", 10, 1, 28), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(CqkdError, match="not a loadable weights file"):
        load_teacher(str(tmp_path / "module.pt"), info, "cnn-small")
    torch.save(build_model("cnn-small", 10, 1, 28).state_dict(), tmp_path / "t.pt")
    cfg = RunConfig.from_dict(dict(kind="distill", dataset="synthetic", teacher=str(tmp_path / "t.pt"),
                                   teacher_model="cnn-small", size=14, train_samples=64, epochs=1,
                                   batch_size=32, accelerator="cpu"))
    metrics = fit_run(cfg, tmp_path / "run", progress=False)
    assert metrics["teacher"] == str(tmp_path / "t.pt") and metrics["teacher_model"] == "cnn-small"


def test_teacher_weights_without_internet_is_one_line(tmp_path):
    data = make_folder(tmp_path / "in1k", classes=1000, per_class=1, val_per_class=0, size=40)
    for c in ("class0000", "class0001"):
        make_folder_image = data / "val" / c
        (make_folder_image / "img0.png").write_bytes((data / "train" / c / "img0.png").read_bytes())
    env = {"TORCH_HOME": str(tmp_path / "torch-home"), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    r = run_cli("distill", "--dataset", "imagefolder", "--data-dir", str(data), "--crop-size", "32",
                "--size", "16", "--teacher-model", "resnet50", "--teacher-weights", "IMAGENET1K_V2",
                "--accelerator", "cpu", "--out", str(tmp_path / "run"), "--quiet", env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cqkd: error: cannot download torchvision weights torchvision:resnet50.IMAGENET1K_V2")
    assert "--teacher FILE --teacher-model resnet50" in lines[0]


def test_torchvision_pretrained_teacher_from_the_hub_cache(tmp_path, monkeypatch):
    """Pretrained weights already in torch.hub's cache load offline, with the weights' mean/std."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, cache / weights.url.rsplit("/", 1)[-1])
    info = DatasetInfo("imagefolder", 1000, 3, 160, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    teacher = load_teacher(None, info, "resnet18", "IMAGENET1K_V1")
    assert teacher.path == "torchvision:resnet18.IMAGENET1K_V1"
    assert teacher.mean == (0.485, 0.456, 0.406) and teacher.std == (0.229, 0.224, 0.225)
    assert teacher.input_size == 160 and not teacher.model.training
    assert torch.equal(teacher.model.state_dict()["fc.weight"], state["fc.weight"])


def test_teacher_weights_checks(tmp_path):
    info = load_dataset("synthetic").info
    with pytest.raises(CqkdError, match="1000 classes but the dataset has 10"):
        load_teacher(None, info, "resnet50", "IMAGENET1K_V2")
    with pytest.raises(CqkdError, match="unknown weights 'NOPE'"):
        load_teacher(None, info, "resnet50", "NOPE")
    with pytest.raises(CqkdError, match="needs teacher_model"):
        RunConfig.from_dict(dict(kind="distill", teacher_weights="IMAGENET1K_V2"))
    with pytest.raises(CqkdError, match="needs a teacher"):
        RunConfig.from_dict(dict(kind="distill"))


# ------------------------------------------------------------------------------ precision

@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_precision_reaches_lightning_and_bf16_step_runs():
    cfg = RunConfig.from_dict(dict(dataset="synthetic", precision="bf16-mixed", accelerator="cpu"))
    trainer = make_trainer(cfg, None, progress=False)
    assert trainer.precision == "bf16-mixed"
    info = load_dataset("synthetic").info
    module = CQKDModule(build_model("cnn-small", 10, 1, 14), cfg.replace(size=14), info)
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step((x, torch.tensor([0, 1, 2, 3]), torch.arange(4)), 0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------------------ benchmark scripts

def test_gpu_check_smoke_on_cpu_and_fails_fast_without_cuda(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.py"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--steps", "2", "--batch-size", "4",
                        "--json", str(tmp_path / "g.json")],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "distill:" in r.stdout and "supervised:" in r.stdout
    res = json.loads((tmp_path / "g.json").read_text())["results"]
    assert res["distill"]["images_per_s"] > 0 and res["supervised"]["images_per_s"] > 0
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "CUDA is not available" in r.stderr


def test_recipe_is_valid(tmp_path):
    """The ImageNet recipe plans, through the sweep engine, 1 teacher + 3 supervised + 6 CQKD
    runs with the paper's settings."""
    import yaml

    from cqkd.sweep.plan import plan_sweep

    recipe = yaml.safe_load((ROOT / "configs" / "imagenet-resnet50-to-resnet18.yaml").read_text())
    plan = plan_sweep(recipe, tmp_path / "sweep")
    by_group: dict[str, list[RunConfig]] = {}
    for run in plan.runs:
        by_group.setdefault(run.group, []).append(run.cfg)
    (teacher,) = by_group["teachers"]
    assert (teacher.model, teacher.size, teacher.crop_size, teacher.dataset) == ("resnet50", 224, 224, "imagefolder")
    assert sorted(c.size for c in by_group["supervised"]) == [28, 56, 112]
    distill = by_group["distill"]
    assert sorted((c.size, c.temperature) for c in distill) == [(s, t) for s in (28, 56, 112) for t in (10.0, 20.0)]
    for c in [teacher, *by_group["supervised"], *distill]:
        assert (c.epochs, c.lr, c.optimizer, c.schedule) == (20, 1e-3, "adamw", "onecycle")
    assert all(c.alpha == 0.5 and c.model == "resnet18" and c.kind == "distill" for c in distill)
