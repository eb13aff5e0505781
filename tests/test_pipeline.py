"""The pipeline end to end: loss, degradation, views, teacher handling, runs and the CLI."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from cqkd.cli import main
from cqkd.core.config import RunConfig
from cqkd.distill.loss import distillation_loss, soft_targets
from cqkd.views.augment import ViewSpec, apply_views, step_generator
from cqkd.views.degrade import Degradation

# ----------------------------------------------------------------------------- loss


def test_loss_golden_values():
    # Two classes, one sample. Student logits (0, 0) -> p_s^T = (1/2, 1/2) at any T.
    # Teacher logits (2 ln 3, 0) at T=2 -> p_t^T = softmax(ln 3, 0) = (3/4, 1/4).
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.75*0.405465 - 0.25*0.693147 = 0.130812
    # CE(z_s, y=0) = ln 2 = 0.693147;  loss = 0.5*ln 2 + 0.5*4*0.130812 = 0.608198
    z_s = torch.tensor([[0.0, 0.0]])
    z_t = torch.tensor([[2 * math.log(3), 0.0]])
    terms = distillation_loss(z_s, z_t, torch.tensor([0]), temperature=2.0, alpha=0.5)
    assert terms["kl"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert terms["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.608198, abs=1e-5)


def test_loss_teacher_temperature_divides_teacher_logits():
    # T_cal = 2 and T = 1 must equal T_cal = 1 with the teacher logits halved.
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    a = distillation_loss(z_s, z_t, y, temperature=3.0, alpha=0.7, t_cal=2.0)
    b = distillation_loss(z_s, z_t / 2.0, y, temperature=3.0, alpha=0.7)
    assert torch.allclose(a["loss"], b["loss"])
    assert torch.allclose(soft_targets(z_t, 3.0, 2.0), F.softmax(z_t / 6.0, -1))


def test_loss_gradient_matches_analytic_form():
    g = torch.Generator().manual_seed(1)
    n, k, T, alpha = 6, 4, 5.0, 0.8
    z_s = torch.randn(n, k, generator=g, dtype=torch.float64).requires_grad_()
    z_t = torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    distillation_loss(z_s, z_t, y, T, alpha=1.0)["loss"].backward()
    # d(T^2 * KL_batchmean)/dz_s = T * (p_s^T - p_t^T) / N
    expected = T * (F.softmax(z_s.detach() / T, -1) - F.softmax(z_t / T, -1)) / n
    assert torch.allclose(z_s.grad.double(), expected, atol=1e-6)
    # with alpha, the KL part is scaled by alpha and CE's gradient (p_s - onehot)/N is added
    z_s.grad = None
    distillation_loss(z_s, z_t, y, T, alpha=alpha)["loss"].backward()
    ce_grad = (F.softmax(z_s.detach(), -1) - F.one_hot(y, k)) / n
    assert torch.allclose(z_s.grad.double(), alpha * expected + (1 - alpha) * ce_grad, atol=1e-6)


def test_alpha_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    assert torch.allclose(distillation_loss(z_s, z_t, y, 4.0, 0.0)["loss"], F.cross_entropy(z_s, y))

# ----------------------------------------------------------------------------- degradation and views


def test_degradation_output_size_and_antialias():
    checker = ((torch.arange(28).view(1, -1) + torch.arange(28).view(-1, 1)) % 2).float().expand(2, 1, 28, 28)
    out = Degradation(size=7)(checker)
    assert out.shape == (2, 1, 7, 7)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.02)
    # antialias (the default) low-passes over the whole 4x4 footprint; plain bilinear
    # interpolation only mixes 2x2 neighbours, so pixel noise survives twice as strong
    noise = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    smooth, aliased = Degradation(size=7)(noise), Degradation(size=7, antialias=False)(noise)
    assert smooth.std() < 0.7 * aliased.std()
    assert Degradation(size=7, upsample=True)(checker).shape == (2, 1, 28, 28)


def test_degradation_spec_roundtrip_and_errors():
    d = Degradation.parse("size=7,mode=bicubic,noise=0.05")
    assert (d.size, d.mode, d.noise) == (7, "bicubic", 0.05)
    assert Degradation.parse(d.spec()) == d
    from cqkd.errors import CqkdError

    for bad in ("size=0", "mode=bilinear", "size=7,colour=red", "size=x"):
        with pytest.raises(CqkdError):
            Degradation.parse(bad)


def test_views_flip_and_translate():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).repeat(3, 1, 1, 1)
    params = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, -1]])
    out = apply_views(x, params)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[1].flip(-1))
    # dx=+1 moves content right, dy=-1 moves it up; uncovered pixels are 0
    expected = torch.zeros(4, 4)
    expected[:3, 1:] = x[2, 0, 1:, :3]
    assert torch.equal(out[2, 0], expected)
    spec = ViewSpec(flip=True, translate=2)
    assert spec.enumerate().shape == (spec.num_views, 3) == (50, 3)
    a, b = spec.sample(5, step_generator(0, 3)), spec.sample(5, step_generator(0, 3))
    assert torch.equal(a, b)


def test_student_view_is_degraded_teacher_view(tiny_teacher):
    """In a training step the student's input is the degraded version of the very view the
    teacher sees (same flip and shift), not an independently augmented copy."""
    from cqkd.data.registry import load_dataset
    from cqkd.nets.registry import build_model
    from cqkd.nets.teacher import load_teacher
    from cqkd.train.module import CQKDModule

    cfg = RunConfig.from_dict({**TINY, "kind": "distill", "teacher": str(tiny_teacher), "size": 7,
                               "augment": "flip,translate=3", "teacher_cache": "off"})
    splits = load_dataset("synthetic", train_samples=64)
    module = CQKDModule(build_model("cnn-small", 10, 1, 7), cfg, splits.info, load_teacher(str(tiny_teacher), splits.info))
    seen = {}
    module.teacher.register_forward_pre_hook(lambda m, a: seen.__setitem__("teacher", a[0].clone()))
    module.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("student", a[0].clone()))
    x, y = splits.train.images[:32], splits.train.labels[:32]
    module.training_step((x, y, torch.arange(32)), 0)
    mean, std = splits.info.mean[0], splits.info.std[0]
    teacher_view = seen["teacher"] * std + mean
    student_view = seen["student"] * std + mean
    assert not torch.allclose(teacher_view, x.float() / 255)  # augmentation did something
    assert torch.allclose(Degradation(size=7)(teacher_view), student_view, atol=1e-5)


def test_teacher_frozen_and_in_eval_mode(tiny_teacher, tmp_path):
    import lightning as L

    from cqkd.data.registry import load_dataset, make_loader
    from cqkd.nets.registry import build_model
    from cqkd.nets.teacher import load_teacher
    from cqkd.train.module import CQKDModule

    cfg = RunConfig.from_dict({**TINY, "kind": "distill", "teacher": str(tiny_teacher), "size": 7,
                               "teacher_cache": "off"})
    splits = load_dataset("synthetic", train_samples=128)
    teacher = load_teacher(str(tiny_teacher), splits.info)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    module = CQKDModule(build_model("cnn-small", 10, 1, 7), cfg, splits.info, teacher)
    modes = []
    module.teacher.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, make_loader(splits.train, 32, shuffle=True))
    assert modes and not any(modes)
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in module.model.parameters())

# ----------------------------------------------------------------------------- data


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path):
    from cqkd.data.fashion_mnist import load_fashion_mnist

    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))
    splits = load_fashion_mnist(tmp_path, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    again = load_fashion_mnist(tmp_path, val_size=10)  # the val split is fixed
    assert torch.equal(again.val.images, splits.val.images)


def test_train_subset_is_balanced_and_fixed():
    from cqkd.data.registry import load_dataset

    a = load_dataset("synthetic", train_samples=100)
    b = load_dataset("synthetic", train_samples=100)
    assert torch.equal(a.train.labels, b.train.labels)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10


def test_synthetic_resolution_really_costs_information():
    """Pairs of classes differ only in fine stripes, which a 7 px view averages away."""
    from cqkd.data.synthetic import make_synthetic

    d = make_synthetic(200, seed=0)
    lo = Degradation(size=7)(d.images.float() / 255)
    pair0, pair1 = lo[d.labels == 0].mean(0), lo[d.labels == 1].mean(0)
    hi0 = d.images[d.labels == 0].float().mean(0) / 255
    hi1 = d.images[d.labels == 1].float().mean(0) / 255
    assert (hi0 - hi1).abs().max() > 0.2
    assert (pair0 - pair1).abs().max() < 0.1

# ----------------------------------------------------------------------------- end to end


def _tiny_args(**extra) -> list[str]:
    args = ["--dataset", "synthetic", "--train-samples", "300", "--epochs", "1", "--batch-size", "64",
            "--accelerator", "cpu", "--quiet"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


REQUIRED = {"top1", "nll", "brier", "ece", "entropy", "size", "model", "params", "flops", "epochs", "seed"}


def test_end_to_end_distill_and_evaluate(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "cqkd-7"
    assert main(["distill", "--teacher", str(tiny_teacher), *_tiny_args(size=7, temperature=4, alpha=0.5, epochs=2),
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert REQUIRED | {"temperature", "alpha", "teacher", "teacher_metrics"} <= set(m)
    assert m["size"] == 7 and m["temperature"] == 4.0 and m["alpha"] == 0.5
    assert m["top1"] > 0.25  # chance is 0.1
    assert 0 <= m["ece"] <= 1 and 0 < m["entropy"] <= math.log(10) + 1e-9
    teacher_m = json.loads((tiny_teacher / "metrics.json").read_text())
    assert m["teacher_metrics"]["top1"] == pytest.approx(teacher_m["top1"], abs=1e-9)
    for f in ("config.yaml", "status.json", "test_logits.pt", "model.safetensors", "metrics.csv",
              "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (out / f).exists(), f
    logits = torch.load(out / "test_logits.pt", weights_only=True)
    assert logits["logits"].shape == (1000, 10) and logits["labels"].shape == (1000,)
    # evaluate recomputes the same metrics from the saved weights
    from cqkd.train.fit import evaluate_run

    again = evaluate_run(out, progress=False)
    assert again["top1"] == pytest.approx(m["top1"], abs=1e-6)
    assert again["ece"] == pytest.approx(m["ece"], abs=1e-6)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--quiet"]) == 0
    assert "top1" in capsys.readouterr().out
    # the config saved with the run is enough to rerun it
    assert RunConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text())).digest() == m["config_digest"]


def test_supervised_run_records_every_metric(tmp_path):
    out = tmp_path / "sup"
    assert main(["train", *_tiny_args(size=14), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert REQUIRED <= set(m) and m["kind"] == "train" and m["size"] == 14
    assert json.loads((out / "status.json").read_text())["state"] == "finished"

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, culprit", [
    (["train", "--dataset", "imagenet-typo", "--out", "{out}"], "imagenet-typo"),
    (["train", "--dataset", "synthetic", "--model", "cnn-smal", "--out", "{out}"], "cnn-small"),
    (["train", "--dataset", "synthetic", "--size", "64", "--out", "{out}"], "--size 64"),
    (["train", "--dataset", "synthetic", "--size", "0", "--out", "{out}"], "size"),
    (["distill", "--dataset", "synthetic", "--teacher", "{empty}", "--out", "{out}"], "config.yaml"),
    (["distill", "--dataset", "synthetic", "--teacher", "{teacher}", "--temperature", "0", "--out", "{out}"], "temperature"),
    (["distill", "--dataset", "synthetic", "--teacher", "{teacher}", "--temperature", "-2", "--out", "{out}"], "temperature"),
    (["distill", "--dataset", "synthetic", "--teacher", "{teacher}", "--alpha", "1.5", "--out", "{out}"], "alpha"),
    (["train", "--dataset", "synthetic", "--out", "{teacher}"], "--force"),
])
def test_bad_input_is_one_line_and_exit_2(args, culprit, tiny_teacher, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fill = {"out": str(tmp_path / "out"), "empty": str(tmp_path / "empty"), "teacher": str(tiny_teacher)}
    code = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("cqkd: error:") and culprit in err
    assert not (tmp_path / "out").exists()
    assert json.loads((tiny_teacher / "status.json").read_text())["state"] == "finished"


def test_teacher_without_checkpoint_is_refused(tiny_teacher, tmp_path, capsys):
    import shutil

    broken = tmp_path / "teacher-no-weights"
    shutil.copytree(tiny_teacher, broken)
    (broken / "model.safetensors").unlink()
    assert main(["distill", "--dataset", "synthetic", "--teacher", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_teacher_test_outputs_are_shared_between_students(tiny_teacher, tmp_path):
    """The second student of a teacher reuses the teacher's saved test logits, and its
    teacher metrics equal those the first student computed with the network."""
    from cqkd.train.fit import fit_run

    for f in (tiny_teacher / "eval").glob("*.pt") if (tiny_teacher / "eval").exists() else []:
        f.unlink()
    base = {**TINY, "kind": "distill", "teacher": str(tiny_teacher), "size": 7, "temperature": 2.0}
    first = fit_run(RunConfig.from_dict(base), tmp_path / "a", progress=False)
    memo = list((tiny_teacher / "eval").glob("test-*.pt"))
    assert len(memo) == 1
    second = fit_run(RunConfig.from_dict({**base, "seed": 1}), tmp_path / "b", progress=False)
    assert second["teacher_metrics"] == first["teacher_metrics"]
    assert second["teacher_lr_metrics"] == first["teacher_lr_metrics"]
    a, b = torch.load(tmp_path / "a" / "test_logits.pt"), torch.load(tmp_path / "b" / "test_logits.pt")
    assert torch.allclose(a["teacher_logits"], b["teacher_logits"], atol=1e-5)
    # a damaged memo is ignored and rewritten, never trusted
    memo[0].write_bytes(b"garbage")
    third = fit_run(RunConfig.from_dict({**base, "seed": 2}), tmp_path / "c", progress=False)
    assert third["teacher_metrics"] == first["teacher_metrics"]
    assert torch.load(memo[0], weights_only=True)["teacher_logits"].shape == (1000, 10)


def test_alpha_zero_distillation_equals_supervised(tmp_path, tiny_teacher):
    """The study's control: a student distilled with α = 0 (the distillation path: teacher
    source, view bank, step generator) equals the supervised student of the same seed, because
    both draw the same views from the same per-image bank and start from the same weights."""
    from cqkd.core.config import RunConfig
    from cqkd.core.rundir import RunDir
    from cqkd.train.fit import fit_run

    common = {**TINY, "model": "cnn-small", "size": 7, "epochs": 2, "seed": 5, "views_per_image": 8}
    sup = fit_run(RunConfig.from_dict({**common, "kind": "train"}), tmp_path / "sup", progress=False)
    dis = fit_run(RunConfig.from_dict({**common, "kind": "distill", "teacher": str(tiny_teacher), "alpha": 0.0,
                                       "temperature": 4.0}), tmp_path / "dis", progress=False)
    a, b = RunDir(tmp_path / "sup").test_logits()["logits"], RunDir(tmp_path / "dis").test_logits()["logits"]
    assert torch.equal(a, b), f"max |Δ logit| = {(a - b).abs().max():.3g}"
    assert sup["top1"] == dis["top1"] and sup["ece"] == dis["ece"]
    # and the control is sensitive: another seed's supervised student differs
    other = fit_run(RunConfig.from_dict({**common, "kind": "train", "seed": 6}), tmp_path / "other", progress=False)
    assert not torch.equal(RunDir(tmp_path / "other").test_logits()["logits"], a)
    del other


def test_channels_last_student_is_the_same_network_in_another_layout(tmp_path):
    """``channels_last`` changes the student's memory layout, not its function: the same weights give the
    same logits up to float rounding; the run's digest records the layout; its weights (saved contiguous)
    evaluated in the default layout reproduce the run's own test logits."""
    from cqkd.data.registry import load_dataset
    from cqkd.nets.registry import build_model
    from cqkd.train.fit import evaluate_run, fit_run
    from cqkd.train.module import CQKDModule
    from cqkd.core.rundir import RunDir

    base = RunConfig.from_dict({**TINY, "model": "cnn-small", "size": 14})
    fast = base.replace(channels_last=True)
    assert fast.digest() != base.digest()
    info = load_dataset("synthetic", train_samples=10).info
    torch.manual_seed(0)
    model = build_model("cnn-small", info.num_classes, info.channels, 14)
    plain = CQKDModule(model, base, info).eval()
    x = torch.rand(8, info.channels, 28, 28)
    with torch.no_grad():
        expected = plain.student_forward(x)
        module = CQKDModule(model, fast, info).eval()  # converts the same network in place
        conv = next(m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(module.student_forward(x), expected, atol=1e-5)

    out = tmp_path / "run"
    fit_run(fast, out, progress=False, quiet=True)
    saved = RunDir(out).test_logits()["logits"]
    outputs: dict[str, torch.Tensor] = {}
    evaluate_run(out, progress=False, outputs=outputs, quiet=True, channels_last=False)
    assert (outputs["logits"] - saved).abs().max() <= 1e-4
