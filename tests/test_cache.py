"""The teacher-output cache: exactness against the online teacher, invalidation, corruption,
and the batch views that the teacher and the student share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.data.registry import load_dataset
from cqkd.distill import cache as cache_lib
from cqkd.distill.methods import (
    kd as kd_method,  # the kd method calls distillation_loss
)
from cqkd.distill.source import make_teacher_source
from cqkd.nets.registry import build_model
from cqkd.nets.teacher import load_teacher
from cqkd.train import fit as training
from cqkd.train import module as train_module
from cqkd.views.augment import ViewBank, ViewSpec, apply_views, step_generator

N_TRAIN = 256  # the end-to-end runs: 4 steps of 64
N_SMALL = 32  # the cache-only tests: 256 teacher forwards per build


def make_teacher_run(path: Path, seed: int = 0, model: str = "cnn-small") -> Path:
    """A teacher run directory with randomly initialised weights (enough for exactness tests,
    and its logits vary a lot from view to view)."""
    from safetensors.torch import save_file

    cfg = RunConfig.from_dict({"kind": "train", "dataset": "synthetic", "model": model, "size": 28, "epochs": 1})
    run = RunDir(path)
    run.prepare(cfg, force=True)
    torch.manual_seed(seed)
    net = build_model(model, 10, 1, 28)
    with torch.no_grad():  # make BN statistics non-trivial so eval mode is not the identity
        net.train()
        net(torch.rand(64, 1, 28, 28))
        net.head[-1].weight.mul_(30)  # confident, view-dependent outputs: a wrong view shows in the loss
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.weights_file))
    run.set_state("finished")
    (run.metrics_file).write_text("{}")
    return path


@pytest.fixture(scope="module")
def splits():
    return load_dataset("synthetic", train_samples=N_TRAIN)


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic", train_samples=N_SMALL)


@pytest.fixture()
def teacher_dir(tmp_path):
    return make_teacher_run(tmp_path / "teacher")


def distil_cfg(teacher: Path, n: int = N_TRAIN, **kw) -> RunConfig:
    base = dict(kind="distill", dataset="synthetic", train_samples=n, model="cnn-small", size=7, epochs=1,
                batch_size=64, teacher=str(teacher), temperature=4.0, alpha=0.5, seed=3, accelerator="cpu")
    return RunConfig.from_dict({**base, **kw})


def prepared_source(cfg: RunConfig, splits, forward=None):
    teacher = load_teacher(cfg.teacher, splits.info)
    source = make_teacher_source(cfg, teacher, splits.train, splits.info.num_classes)
    if forward is None:
        module = train_module.CQKDModule(build_model("cnn-small", 10, 1, 7), cfg, splits.info, teacher)
        forward = module.teacher_forward
    source.prepare(forward, "cpu", progress=False)
    return source


# ------------------------------------------------------------------ exactness

def record_losses(monkeypatch) -> tuple[dict[str, list[tuple[float, float, int]]], list[str]]:
    """Record (loss, kl, label sum) of every training step of the kd method under the key ``mode[0]``
    (set it between runs); returns ``(records, mode)``."""
    records: dict[str, list[tuple[float, float, int]]] = {}
    mode = ["off"]
    real_loss = kd_method.distillation_loss

    def recording_loss(z_s, z_t, y, *args):
        terms = real_loss(z_s, z_t, y, *args)
        if z_s.requires_grad:  # training steps only
            records.setdefault(mode[0], []).append((float(terms["loss"]), float(terms["kl"]), int(y.sum())))
        return terms

    monkeypatch.setattr(kd_method, "distillation_loss", recording_loss)
    return records, mode



def test_cached_distillation_matches_online_at_every_step(tmp_path, teacher_dir, monkeypatch):
    """Two short distillation runs, same seed: teacher online vs teacher cache. Same views, the
    same loss at every step and the same final metrics, up to float16 rounding of the logits."""
    records, mode = record_losses(monkeypatch)
    m_off = training.fit_run(distil_cfg(teacher_dir, teacher_cache="off"), tmp_path / "off", progress=False)
    mode[0] = "auto"
    m_auto = training.fit_run(distil_cfg(teacher_dir, teacher_cache="auto"), tmp_path / "auto", progress=False)

    assert m_off["teacher_source"] == "online" and m_auto["teacher_source"] == "cache"
    assert m_auto["teacher_cache_built"] and m_auto["teacher_cache_build_s"] > 0
    assert m_auto["views_per_image"] == m_off["views_per_image"] == 8
    saved = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert saved["teacher_cache"] == "auto" and saved["views_per_image"] == 8 and "teacher_cache_build_s" in saved

    off, auto = records["off"], records["auto"]
    assert len(off) == len(auto) == N_TRAIN // 64
    for step, (a, b) in enumerate(zip(off, auto)):
        assert a[2] == b[2], f"step {step}: different batches"
        assert a[0] == pytest.approx(b[0], rel=1e-3, abs=1e-4), f"step {step}: loss {a[0]} vs {b[0]}"
        assert a[1] == pytest.approx(b[1], rel=1e-3, abs=1e-4), f"step {step}: KL {a[1]} vs {b[1]}"
        assert a[1] > 0.01  # the soft term matters, so a wrong teacher output would show
    for key in ("top1", "nll", "ece", "kl_teacher_student"):
        assert m_off[key] == pytest.approx(m_auto[key], rel=1e-2, abs=2e-3), key


def test_cached_logits_equal_online_logits_for_the_same_views(teacher_dir, splits):
    """Step by step: the same generator gives the same views in both modes, and the cached
    logits are the online logits rounded to float16."""
    online = prepared_source(distil_cfg(teacher_dir, teacher_cache="off"), splits)
    cached = prepared_source(distil_cfg(teacher_dir, teacher_cache="auto"), splits)
    assert online.cache is None and cached.cache is not None
    x, idx = splits.train.images[:50], torch.arange(50) * 5
    x = splits.train.images[idx]
    for step in range(3):
        x1, z1 = online(x, idx, step_generator(3, step))
        x2, z2 = cached(x, idx, step_generator(3, step))
        assert torch.equal(x1, x2)
        assert torch.allclose(z2, z1.half().float(), rtol=2e-3, atol=2e-3)
        assert not torch.equal(z1, z2.roll(1, 0))  # the logits differ per sample: the test can fail
    # different steps draw different views (the bank has 8 per image)
    a, _ = online(x, idx, step_generator(3, 0))
    b, _ = online(x, idx, step_generator(3, 1))
    assert not torch.equal(a, b)


# ------------------------------------------------------------------ invalidation and corruption

def test_cache_is_reused_and_rebuilt_when_teacher_views_or_k_change(tmp_path, teacher_dir, small):
    splits = small
    cfg = distil_cfg(teacher_dir, N_SMALL)
    first = prepared_source(cfg, splits)
    assert first.built and first.cache is not None
    again = prepared_source(cfg, splits)
    assert not again.built and again.cache.path == first.cache.path

    for changed in (dict(augment="flip,translate=1"), dict(views_per_image=4),
                    dict(augment="flip,translate=1", views_per_image="all")):
        other = prepared_source(distil_cfg(teacher_dir, N_SMALL, **changed), splits)
        assert other.built, changed
        assert other.cache.path != first.cache.path, changed

    # a retrained teacher (new weights file) gets a new cache
    make_teacher_run(teacher_dir, seed=1)
    retrained = prepared_source(cfg, splits)
    assert retrained.built and retrained.cache.path != first.cache.path
    assert not torch.equal(torch.from_numpy(retrained.cache.logits[:10].copy()),
                           torch.from_numpy(first.cache.logits[:10].copy()))


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "header-edit", "header-garbage", "views"])
def test_damaged_cache_is_detected_and_rebuilt(teacher_dir, small, damage):
    splits = small
    cfg = distil_cfg(teacher_dir, N_SMALL)
    source = prepared_source(cfg, splits)
    path = source.cache.path
    good = source.cache.logits.copy()
    del source
    logits = path / cache_lib.LOGITS_FILE
    if damage == "truncate":
        logits.write_bytes(logits.read_bytes()[:-100])
    elif damage == "flip-byte":
        raw = bytearray(logits.read_bytes())
        raw[1234] ^= 0xFF
        logits.write_bytes(bytes(raw))
    elif damage == "header-edit":
        header = json.loads((path / cache_lib.HEADER_FILE).read_text())
        header["spec"]["k"] = 7
        (path / cache_lib.HEADER_FILE).write_text(json.dumps(header))
    elif damage == "header-garbage":
        (path / cache_lib.HEADER_FILE).write_text('{"format": "cqkd-teacher-cache", ')
    elif damage == "views":
        raw = bytearray((path / cache_lib.VIEWS_FILE).read_bytes())
        raw[0] ^= 0x01
        (path / cache_lib.VIEWS_FILE).write_bytes(bytes(raw))

    teacher = load_teacher(str(teacher_dir), splits.info)
    spec = make_teacher_source(cfg, teacher, splits.train, 10).spec
    bank = ViewBank(ViewSpec.parse(cfg.augment), N_SMALL, cfg.views_per_image, cache_lib.BANK_SEED)
    with pytest.raises(cache_lib.CacheInvalid):
        cache_lib.TeacherCache.open(path, spec, bank)

    rebuilt = prepared_source(cfg, splits)
    assert rebuilt.built
    assert rebuilt.cache.path == path
    assert (rebuilt.cache.logits == good).all()


# ------------------------------------------------------------------ the batch views

def naive_view(img: torch.Tensor, flip: int, dx: int, dy: int) -> torch.Tensor:
    """One image, one view, pixel by pixel: the definition apply_views must match."""
    c, h, w = img.shape
    src = img.flip(-1) if flip else img
    out = torch.zeros_like(img)
    for r in range(h):
        for col in range(w):
            r0, c0 = r - dy, col - dx
            if 0 <= r0 < h and 0 <= c0 < w:
                out[:, r, col] = src[:, r0, c0]
    return out


def test_apply_views_matches_the_pixel_definition(splits):
    x = splits.train.images[:12]
    params = ViewSpec(flip=True, translate=3).sample(12, step_generator(0, 5))
    params[0] = torch.tensor([1, 3, -2])
    params[1] = torch.tensor([0, 0, 0])
    out = apply_views(x, params)
    for i in range(12):
        assert torch.equal(out[i], naive_view(x[i], *params[i].tolist())), params[i]


def test_apply_views_matches_the_pixel_definition_for_every_view():
    # every view of flip,translate=2 (50) on a 3-channel, non-square batch, uint8 and float:
    # the one-gather implementation must move exactly the pixels naive_view moves
    views = ViewSpec(flip=True, translate=2).enumerate()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (len(views), 3, 5, 7), generator=g, dtype=torch.uint8)
    for batch in (x, x.float() / 255):
        out = apply_views(batch, views)
        assert out.dtype == batch.dtype and out.shape == batch.shape
        for i in range(len(views)):
            assert torch.equal(out[i], naive_view(batch[i], *views[i].tolist())), views[i]
    flips_only = torch.tensor([[1, 0, 0], [0, 0, 0]])  # no shift: the flip alone
    assert torch.equal(apply_views(x[:2], flips_only), torch.stack([x[0].flip(-1), x[1]]))


def test_view_bank_is_reproducible_distinct_and_complete():
    spec = ViewSpec(flip=True, translate=2)
    a, b = ViewBank(spec, 100, 8, seed=0), ViewBank(spec, 100, 8, seed=0)
    assert torch.equal(a.all_params(), b.all_params())
    assert not torch.equal(a.all_params(), ViewBank(spec, 100, 8, seed=1).all_params())
    for row in a.all_params():  # k distinct views per image
        assert len({tuple(v) for v in row.tolist()}) == 8
    full = ViewBank(spec, 5, "all")
    assert full.k == spec.num_views == 50 and full.table is None
    assert ViewBank(ViewSpec.parse("none"), 5, 8).k == 1
    g1, g2 = step_generator(0, 7), step_generator(0, 7)
    assert torch.equal(a.draw(64, g1), a.draw(64, g2))


def test_teacher_and_student_see_the_same_view(teacher_dir, splits):
    """In the training step, the teacher's input and the student's (before degradation) are
    the same flipped/translated view, reproducible from (seed, step)."""
    cfg = distil_cfg(teacher_dir, teacher_cache="off", augment="flip,translate=3")
    teacher = load_teacher(cfg.teacher, splits.info)
    module = train_module.CQKDModule(build_model("cnn-small", 10, 1, 7), cfg, splits.info, teacher,
                                 train_data=splits.train)
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    forward = module.teacher_forward

    def spy_teacher(x):
        seen["teacher"].append(x.clone())
        return forward(x)

    degrade = module.degrade

    def spy_degrade(x, g=None):
        seen["student"].append(x.clone())
        return degrade(x, g)

    module.source.prepare(spy_teacher, "cpu")
    module.degrade = spy_degrade
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    batch = (splits.train.images[idx], splits.train.labels[idx], idx)
    with pytest.warns(UserWarning):  # self.log without a trainer
        module.training_step(batch, 0)
        module.training_step(batch, 0)

    t1, t2 = seen["teacher"]
    s1, s2 = seen["student"]
    assert torch.equal(t1, s1) and torch.equal(t1, t2) and torch.equal(s1, s2)
    # the views are the bank's views for (seed, step 0), applied as the pixel definition says
    bank = module.source.bank
    which = bank.draw(len(idx), step_generator(cfg.seed, 0, 0))
    params = bank.params(idx, which)
    assert params[:, 1:].abs().max() > 0 or params[:, 0].any()
    for i in range(len(idx)):
        expected = naive_view(splits.train.images[idx[i]], *params[i].tolist()).float() / 255
        assert torch.equal(t1[i], expected)


def test_views_per_image_option_and_digest():
    from cqkd.errors import CqkdError

    assert RunConfig.from_dict({"views_per_image": "12"}).views_per_image == 12  # from the command line
    assert RunConfig.from_dict({"views_per_image": "all"}).views_per_image == "all"
    for bad in (0, -1, "some"):
        with pytest.raises(CqkdError, match="views_per_image"):
            RunConfig.from_dict({"views_per_image": bad})
    assert RunConfig().teacher_cache == "auto"
    # the cache is a speed setting: the same experiment either way; K changes the experiment
    assert RunConfig(teacher_cache="off").digest() == RunConfig(teacher_cache="auto").digest()
    assert RunConfig(views_per_image=4).digest() != RunConfig(views_per_image=8).digest()


def test_auto_falls_back_to_online_where_the_cache_is_not_exact(teacher_dir, small):
    teacher = load_teacher(str(teacher_dir), small.info)
    double = make_teacher_source(distil_cfg(teacher_dir, N_SMALL, precision="64-true"), teacher, small.train, 10)
    assert not double.use_cache and "precision" in double.reason
    # mixed precision: the cache is built under the same autocast as the online teacher, and kept apart
    mixed = make_teacher_source(distil_cfg(teacher_dir, N_SMALL, precision="bf16-mixed"), teacher, small.train, 10)
    assert mixed.use_cache and mixed.spec.teacher_precision == "bf16-mixed"
    off = make_teacher_source(distil_cfg(teacher_dir, N_SMALL, teacher_cache="off"), teacher, small.train, 10)
    assert not off.use_cache
    auto = make_teacher_source(distil_cfg(teacher_dir, N_SMALL), teacher, small.train, 10)
    assert auto.use_cache and auto.spec.key() != mixed.spec.key()


def test_other_ranks_wait_for_rank_zero_to_build(teacher_dir, small):
    """With DDP only global rank 0 builds; the other ranks wait for the finished cache."""
    import threading
    import time

    cfg = distil_cfg(teacher_dir, N_SMALL)
    teacher = load_teacher(cfg.teacher, small.info)
    forward = train_module.CQKDModule(build_model("cnn-small", 10, 1, 7), cfg, small.info, teacher).teacher_forward
    rank0, rank1 = (make_teacher_source(cfg, teacher, small.train, 10) for _ in range(2))
    barrier = threading.Barrier(2, timeout=60)
    calls = []

    def counting(x):
        calls.append(threading.current_thread().name)
        return forward(x)

    def run_rank0():
        time.sleep(0.5)  # rank 1 starts waiting before anything exists
        rank0.prepare(counting, "cpu", 0, 2, barrier.wait, progress=False)

    thread = threading.Thread(target=run_rank0, name="rank0")
    thread.start()
    rank1.prepare(counting, "cpu", 1, 2, barrier.wait, progress=False)
    thread.join()
    assert rank0.built and not rank1.built
    assert rank1.cache is not None and rank1.cache.path == rank0.cache.path
    assert set(calls) == {"rank0"}
