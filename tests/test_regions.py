"""Region-level teacher caches for image folders, top-k targets, resumable and parallel builds."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache import (
    N_SMALL,
    distil_cfg,
    make_teacher_run,
    prepared_source,
    record_losses,
)
from test_scale import make_folder

from cqkd.core.config import RunConfig
from cqkd.core.rundir import RunDir
from cqkd.data.registry import load_dataset
from cqkd.distill import cache as cache_lib
from cqkd.distill import cache_build
from cqkd.distill.source import make_teacher_source, memory_views
from cqkd.distill.targets import kl_to_full, topk_decode, topk_encode, topk_logits
from cqkd.nets.registry import build_model
from cqkd.nets.teacher import load_teacher
from cqkd.train import fit as training
from cqkd.train import module as train_module
from cqkd.views.augment import ViewBank, ViewSpec
from cqkd.views.regions import CropSpec, RegionBank, cut_region, draw_region

CROP = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=8, val_per_class=2, size=28)


def make_folder_teacher(path: Path, seed: int = 0, crop: int = CROP) -> Path:
    """A cnn-small teacher run for 3-class image folders, random weights, confident outputs."""
    from safetensors.torch import save_file

    cfg = RunConfig.from_dict({"kind": "train", "dataset": "imagefolder", "model": "cnn-small", "size": crop,
                               "crop_size": crop, "epochs": 1})
    run = RunDir(path)
    run.prepare(cfg, force=True)
    torch.manual_seed(seed)
    net = build_model("cnn-small", 3, 3, crop)
    with torch.no_grad():
        net.train()
        net(torch.rand(32, 3, crop, crop))
        net.head[-1].weight.mul_(30)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.weights_file))
    run.metrics_file.write_text("{}")
    run.set_state("finished")
    return path


def folder_cfg(data: Path, teacher: Path, **kw) -> RunConfig:
    base = dict(kind="distill", dataset="imagefolder", data_dir=str(data), crop_size=CROP, size=8, val_size=3,
                model="cnn-small", epochs=1, batch_size=7, teacher=str(teacher), temperature=4.0, alpha=0.5,
                seed=3, accelerator="cpu", views_per_image=4)
    return RunConfig.from_dict({**base, **kw})


def folder_source(cfg: RunConfig, chunk_views: int = cache_lib.CHUNK_VIEWS, forward=None):
    splits = load_dataset("imagefolder", cfg.data_dir, val_size=cfg.val_size, crop_size=cfg.crop_size,
                          views_per_image=cfg.views_per_image)
    teacher = load_teacher(cfg.teacher, splits.info)
    source = make_teacher_source(cfg, teacher, splits.train, splits.info.num_classes)
    if forward is None:
        forward = train_module.CQKDModule(build_model("cnn-small", 3, 3, 8), cfg, splits.info, teacher).teacher_forward
    source.prepare(forward, "cpu", progress=False, chunk_views=chunk_views)
    return source, splits


# ------------------------------------------------------------------ regions

def test_regions_are_reproducible_inside_the_image_and_cut_as_drawn():
    bank = RegionBank(CropSpec(16), k=6, seed=0)
    a, b = bank.regions(5, 40, 30), bank.regions(5, 40, 30)
    assert torch.equal(a, b) and a.shape == (6, 5)
    assert not torch.equal(a, bank.regions(6, 40, 30))  # per image
    assert not torch.equal(a, RegionBank(CropSpec(16), 6, seed=1).regions(5, 40, 30))  # per seed
    for h, w in ((40, 30), (9, 200), (200, 9), (1, 1)):  # the last two fall back to a central crop
        for top, left, bh, bw, flip in bank.regions(0, h, w).tolist():
            assert 0 <= top and 0 <= left and 0 < bh and 0 < bw and top + bh <= h and left + bw <= w and flip in (0, 1)
    img = torch.arange(3 * 40 * 30, dtype=torch.int64).reshape(3, 40, 30).remainder(251).to(torch.uint8)
    crop = cut_region(img, torch.tensor([4, 2, 16, 16, 1]), 16)  # a 16 px box at 16 px: an exact copy, flipped
    assert torch.equal(crop, img[:, 4:20, 2:18].flip(-1))
    g = torch.Generator().manual_seed(0)
    areas = [float(r[2] * r[3]) / (100 * 100) for r in (draw_region(100, 100, CropSpec(8), g) for _ in range(400))]
    assert 0.08 <= min(areas) and max(areas) <= 1 and 0.4 < sum(areas) / len(areas) < 0.65  # U(0.08, 1) in area


def test_cached_and_online_distillation_on_an_image_folder_give_the_same_loss_at_every_step(tmp_path, folder,
                                                                                            monkeypatch):
    """Same crops (the bank's regions, cut in the loader), same teacher: online vs cache. The
    cached run replays the stored regions in a DataLoader worker."""
    teacher = make_folder_teacher(tmp_path / "teacher")
    records, mode = record_losses(monkeypatch)
    m_off = training.fit_run(folder_cfg(folder, teacher, teacher_cache="off", epochs=2), tmp_path / "off",
                             progress=False)
    mode[0] = "auto"
    m_auto = training.fit_run(folder_cfg(folder, teacher, teacher_cache="auto", epochs=2, num_workers=1),
                              tmp_path / "auto", progress=False)
    assert m_off["teacher_source"] == "online" and m_auto["teacher_source"] == "cache"
    assert m_auto["teacher_cache_built"] and m_auto["views_per_image"] == 4
    assert "bank of 4 per image" in m_auto["train_views"]
    off, auto = records["off"], records["auto"]
    assert len(off) == len(auto) == 2 * (21 // 7)
    for step, (a, b) in enumerate(zip(off, auto)):
        assert a[2] == b[2], f"step {step}: different batches"
        assert a[0] == pytest.approx(b[0], rel=1e-3, abs=1e-4), f"step {step}: loss {a[0]} vs {b[0]}"
        assert a[1] == pytest.approx(b[1], rel=1e-3, abs=1e-4), f"step {step}: KL {a[1]} vs {b[1]}"
        assert a[1] > 0.01  # the soft term matters, so another crop's teacher output would show
    assert m_off["top1"] == pytest.approx(m_auto["top1"], abs=1e-6)


def test_region_cache_holds_the_bank_crops_and_online_logits(tmp_path, folder):
    teacher = make_folder_teacher(tmp_path / "teacher")
    cfg = folder_cfg(folder, teacher)
    source, splits = folder_source(cfg)
    cache = source.cache
    assert source.built and cache is not None and cache.spec.regions
    train = splits.train
    forward = train_module.CQKDModule(build_model("cnn-small", 3, 3, 8), cfg, splits.info,
                                      load_teacher(cfg.teacher, splits.info)).teacher_forward
    for i in (0, 7, len(train) - 1):
        crops, regions, size = train.bank_views(i)
        stored = np.fromfile(cache.path / "regions.i32", dtype="<i4").reshape(len(train), 4, 5)[i]
        assert np.array_equal(stored, regions.numpy())
        z = cache.lookup(torch.full((4,), i), torch.arange(4))
        assert torch.allclose(z, forward(crops.float() / 255).half().float(), rtol=2e-3, atol=2e-3)
        # the training loader cuts the same crop from the stored region (replay)
        train.replay(cache.path)
        x, _, j, which = train[(i, 2)]
        assert (j, which) == (i, 2) and torch.equal(x, crops[2])
        train.replay(None)


def test_region_cache_is_rebuilt_when_the_teacher_the_crop_or_k_change(tmp_path, folder, capsys):
    teacher = make_folder_teacher(tmp_path / "teacher")
    first, _ = folder_source(folder_cfg(folder, teacher))
    again, _ = folder_source(folder_cfg(folder, teacher))
    assert first.built and not again.built and again.cache.path == first.cache.path
    for changed in (dict(crop_size=24), dict(views_per_image=3)):
        other, _ = folder_source(folder_cfg(folder, teacher, **changed))
        assert other.built and other.cache.path != first.cache.path, changed
    make_folder_teacher(teacher, seed=1)  # retrained: new weights
    retrained, _ = folder_source(folder_cfg(folder, teacher))
    assert retrained.built and retrained.cache.path != first.cache.path
    # damaged: refused with one line, rebuilt in place
    path = retrained.cache.path
    raw = bytearray((path / "regions.i32").read_bytes())
    raw[4] ^= 0x01
    (path / "regions.i32").write_bytes(bytes(raw))
    capsys.readouterr()
    rebuilt, _ = folder_source(folder_cfg(folder, teacher))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rebuilt.built and rebuilt.cache.path == path
    assert len(err) == 1 and "is invalid" in err[0] and "rebuilding" in err[0], err


def test_a_changed_image_is_refused_when_its_regions_are_replayed(tmp_path, folder):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    teacher = make_folder_teacher(tmp_path / "teacher")
    source, splits = folder_source(folder_cfg(data, teacher))
    path = splits.train.paths[0]
    Image.new("RGB", (20, 20)).save(path, format="PNG" if path.endswith("png") else "JPEG")
    with pytest.raises(Exception, match="when the teacher cache"):
        splits.train[(0, 1)]
    assert source.spec.data_digest != splits.train.digest()  # and the next run gets a new cache


# ------------------------------------------------------------------ top-k

def test_topk_golden_values():
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0, math.log(3.0)]])
    index, values = topk_encode(z, 2)
    assert index.tolist() == [[0, 4]]
    rest = math.log((1 + math.e + math.exp(-1)) / 3)  # logsumexp of the others, less log(3)
    assert values[0].tolist() == pytest.approx([2.0, math.log(3.0), rest])
    z_hat = topk_decode(index, values, 5)
    assert z_hat[0].tolist() == pytest.approx([2.0, rest, rest, rest, math.log(3.0)])
    p, q = torch.softmax(z, 1), torch.softmax(z_hat, 1)
    assert q[0, [0, 4]].tolist() == pytest.approx(p[0, [0, 4]].tolist())  # kept classes exact
    assert float(q.sum()) == pytest.approx(1.0)
    assert float(kl_to_full(z, z_hat)[0]) > 0
    assert torch.equal(topk_logits(z, 5), z)  # nothing left out: unchanged


def test_topk_cache_keeps_the_full_softmax_on_the_kept_classes_and_reports_the_kl(tmp_path, small_splits):
    teacher = make_teacher_run(tmp_path / "teacher")
    cfg = distil_cfg(teacher, N_SMALL, teacher_topk=3)
    source = prepared_source(cfg, small_splits)
    full = prepared_source(distil_cfg(teacher, N_SMALL), small_splits)
    assert source.cache.path != full.cache.path and source.spec.logits_bytes == N_SMALL * 8 * (3 * 2 + 4 * 2)
    index, which = torch.arange(N_SMALL).repeat_interleave(8), torch.arange(8).repeat(N_SMALL)
    z = full.cache.lookup(index, which)
    z_hat = source.cache.lookup(index, which)
    p, q = torch.softmax(z, 1), torch.softmax(z_hat, 1)
    kept = z.topk(3, dim=1).indices
    assert torch.allclose(q.gather(1, kept), p.gather(1, kept), rtol=5e-3, atol=1e-4)
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, kept, False)
    rest = q[others].view(len(q), 7)
    assert torch.allclose(rest, rest[:, :1].expand_as(rest), rtol=1e-5)  # shared equally
    report = source.describe()["teacher_topk_error"]
    assert report["k"] == 3 and report["temperatures"][0] == 1.0
    direct = float(kl_to_full(z, z_hat, 1.0).mean())
    assert report["mean_kl"][0] == pytest.approx(direct, rel=0.05, abs=1e-4) and report["mean_kl"][0] > 0
    assert 0 < report["mean_kept_mass"] < 1
    # the online teacher applies the same approximation: cached == online up to float16
    online = prepared_source(distil_cfg(teacher, N_SMALL, teacher_topk=3, teacher_cache="off"), small_splits)
    x = small_splits.train.images[:16]
    from cqkd.views.augment import step_generator

    _, z1 = online(x, torch.arange(16), step_generator(0, 0))
    _, z2 = source(x, torch.arange(16), step_generator(0, 0))
    assert torch.allclose(torch.softmax(z1, 1), torch.softmax(z2, 1), atol=2e-3)


@pytest.fixture(scope="module")
def small_splits():
    return load_dataset("synthetic", train_samples=N_SMALL)


# ------------------------------------------------------------------ resumable, parallel

def synthetic_spec(n: int, k: int = 4) -> cache_lib.CacheSpec:
    return cache_lib.CacheSpec("d", "m", 28, "synthetic", "train", n, "x", n, 10, "flip,translate=2", k, 0)


def fake_teacher(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, 300:310] * 7


def test_interrupted_build_resumes_from_its_finished_chunks(tmp_path, small_splits):
    images = small_splits.train.images
    bank = ViewBank(ViewSpec(), N_SMALL, 4)
    spec = synthetic_spec(N_SMALL)
    produce = memory_views(images, bank, batch_views=16)  # 4 images per call, 2 calls per chunk of 8 images
    calls = []

    def failing(x):
        calls.append(len(x))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return fake_teacher(x)

    with pytest.raises(KeyboardInterrupt):
        cache_build.build(tmp_path / "a", spec, bank, produce, failing, chunk_views=32, progress=False)
    partial = tmp_path / "a" / f".build-{spec.key()}"
    assert not (tmp_path / "a" / spec.key()).exists()
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz"]
    calls.clear()
    path = cache_build.build(tmp_path / "a", spec, bank, produce, failing, chunk_views=32, progress=False)
    assert len(calls) == 4 and not partial.exists()  # only the two missing chunks
    whole = cache_build.build(tmp_path / "b", spec, bank, produce, fake_teacher, chunk_views=32, progress=False)
    assert (path / cache_lib.LOGITS_FILE).read_bytes() == (whole / cache_lib.LOGITS_FILE).read_bytes()
    cache_lib.TeacherCache.open(path, spec, bank)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [spec.key()]


def test_two_ranks_build_their_share_of_the_chunks(tmp_path, small_splits):
    bank = ViewBank(ViewSpec(), N_SMALL, 4)
    spec = synthetic_spec(N_SMALL)
    produce = memory_views(small_splits.train.images, bank, batch_views=32)
    calls: list[str] = []
    lock = threading.Lock()

    def counting(x):
        with lock:
            calls.append(threading.current_thread().name)
        return fake_teacher(x)

    def rank(r: int) -> None:
        cache_build.build(tmp_path, spec, bank, produce, counting, chunk_views=32, progress=False, rank=r, world_size=2)

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == ["rank0", "rank0", "rank1", "rank1"]  # 4 chunks, 2 each
    cache = cache_lib.TeacherCache.open(tmp_path / spec.key(), spec, bank)
    single = cache_build.build(tmp_path / "one", spec, bank, produce, fake_teacher, chunk_views=32, progress=False)
    assert np.array_equal(np.asarray(cache.logits), np.fromfile(single / cache_lib.LOGITS_FILE, dtype="<f2").reshape(-1, 10))
    assert json.loads((single / cache_lib.HEADER_FILE).read_text())["spec"] == spec.fields()
