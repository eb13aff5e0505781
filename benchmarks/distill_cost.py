"""What does distillation cost per training epoch, compared with supervised student training?

Teacher ``cnn-large`` at 28 px; student ``cnn-small`` at 7 and 14 px. For each student size,
one training epoch (Lightning, exactly as ``cqkd train`` / ``cqkd distill`` run it: the same
``CQKDModule``, ``make_trainer`` and loaders, no validation) of

    (a) supervised student training,
    (b) distillation with the teacher run online at every step (``--teacher-cache off``),
    (c) distillation reading the teacher's outputs from the cache (``--teacher-cache auto``),

plus the one-off cache build, and the data path alone (loader fetch; loader + views +
degradation) to show whether data loading limits a step. The modes are interleaved and
repeated; each ratio is the median over repetitions of the ratio of two epochs run back to back,
so that a busy machine slows them alike.

The teacher has random weights (timing does not depend on the weights). Usage::

    PYTHONPATH=src python benchmarks/distill_cost.py [--dataset fashion-mnist] [--train-samples 4000] [--threads N]

The last four lines are the ratios ``online/supervised`` and ``cached/supervised`` at 7 and 14 px.

``--dataset imagefolder`` runs the same comparison on a generated folder of JPEG images decoded
in DataLoader workers (``--folder-images``, ``--crop``, ``--teacher-model``, ``--student``,
``--sizes``, ``--num-workers``): a region bank of ``--views-per-image`` random-resized crops per
image for all three modes, the teacher at ``--crop`` px, the student at each size; the region
cache's build time and size are printed with the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402

from cqkd.core.config import RunConfig  # noqa: E402
from cqkd.core.rundir import RunDir  # noqa: E402
from cqkd.data.fashion_mnist import DEBIAN_FASHION_MNIST
from cqkd.data.registry import load_dataset, make_loader  # noqa: E402
from cqkd.nets.registry import build_model  # noqa: E402
from cqkd.nets.teacher import load_teacher  # noqa: E402
from cqkd.train.module import CQKDModule
from cqkd.train.setup import make_trainer  # noqa: E402
from cqkd.views.augment import ViewSpec, apply_views, step_generator  # noqa: E402


def default_dataset() -> str:
    return "fashion-mnist" if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() else "synthetic"


def make_teacher(path: Path, dataset: str, channels: int, classes: int) -> None:
    from safetensors.torch import save_file

    cfg = RunConfig.from_dict({"kind": "train", "dataset": dataset, "model": "cnn-large", "size": 28})
    run = RunDir(path)
    run.prepare(cfg, force=True)
    torch.manual_seed(0)
    net = build_model("cnn-large", classes, channels, 28)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.weights_file))
    run.metrics_file.write_text("{}")
    run.set_state("finished")


class EpochTimer(L.Callback):
    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds = time.perf_counter() - self.start


def one_epoch(cfg: RunConfig, splits, teacher) -> tuple[float, dict]:
    """Time one training epoch of ``cfg`` through Lightning (as fit_run does, minus val/test)."""
    L.seed_everything(cfg.seed, verbose=False)
    model = build_model(cfg.model, splits.info.num_classes, splits.info.channels,
                        cfg.degradation_spec().output_size(splits.info.image_size))
    module = CQKDModule(model, cfg, splits.info, teacher, train_data=splits.train if teacher else None)
    timer = EpochTimer()
    trainer = make_trainer(cfg, None, progress=False, quiet=True, callbacks=[timer], limit_val_batches=0,
                           enable_checkpointing=False, logger=False)
    loader = make_loader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                         num_workers=cfg.num_workers)
    trainer.fit(module, loader)
    return timer.seconds, (module.source.describe() if module.source is not None else {})


def data_path_epoch(cfg: RunConfig, splits) -> tuple[float, float]:
    """Seconds per epoch to (1) fetch the batches, (2) fetch + views + degradation."""
    loader = make_loader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
    start = time.perf_counter()
    for _ in loader:
        pass
    fetch = time.perf_counter() - start
    views, degrade = ViewSpec.parse(cfg.augment), cfg.degradation_spec()
    start = time.perf_counter()
    for step, (x, y, idx) in enumerate(loader):
        g = step_generator(cfg.seed, step)
        degrade(apply_views(x, views.sample(len(y), g)).float().div_(255), g)
    return fetch, time.perf_counter() - start


def make_jpeg_folder(root: Path, n: int, classes: int = 10, val_per_class: int = 2) -> Path:
    """DIR/train/<class>/*.jpg (n images of 72-120 px a side) and DIR/val/<class>/*.jpg."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", val_per_class * classes)):
        for i in range(count):
            c = i % classes
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(72, 121, 2))
            a = (rng.random((h, w, 3)) * 90).astype(np.uint8)
            a[..., c % 3] += 120
            Image.fromarray(a).save(d / f"{i:06d}.jpg", quality=90)
    return root


def make_folder_teacher(path: Path, model: str, crop: int, classes: int) -> None:
    from safetensors.torch import save_file

    cfg = RunConfig.from_dict({"kind": "train", "dataset": "imagefolder", "model": model, "size": crop,
                               "crop_size": crop})
    run = RunDir(path)
    run.prepare(cfg, force=True)
    torch.manual_seed(0)
    net = build_model(model, classes, 3, crop)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(run.weights_file))
    run.metrics_file.write_text("{}")
    run.set_state("finished")


def folder_main(args: argparse.Namespace) -> None:
    """The comparison on a generated image folder (decoded in DataLoader workers)."""
    tmp = Path(tempfile.mkdtemp(prefix="cqkd-bench-folder-"))
    start = time.perf_counter()
    data = make_jpeg_folder(tmp / "data", args.folder_images)
    sizes = [int(s) for s in args.sizes.split(",")]
    k = int(args.views_per_image)
    splits = load_dataset("imagefolder", data, val_size=10, crop_size=args.crop, views_per_image=k)
    info = splits.info
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; {len(splits.train)} generated "
          f"JPEGs (72-120 px; made in {time.perf_counter() - start:.1f} s), {info.num_classes} classes, crop "
          f"{args.crop}, bank of {k} regions per image, batch {args.batch_size}, {args.num_workers} loader worker(s)")
    make_folder_teacher(tmp / "teacher", args.teacher_model, args.crop, info.num_classes)
    teacher = load_teacher(str(tmp / "teacher"), info)

    def cfg(kind: str, size: int, cache: str = "auto") -> RunConfig:
        raw = dict(kind=kind, dataset="imagefolder", data_dir=str(data), crop_size=args.crop, val_size=10,
                   model=args.student, size=size, epochs=1, batch_size=args.batch_size, accelerator=args.accelerator,
                   precision=args.precision, views_per_image=k, num_workers=args.num_workers)
        if kind == "distill":
            raw.update(teacher=str(tmp / "teacher"), teacher_cache=cache, temperature=4.0, alpha=0.5)
        return RunConfig.from_dict(raw)

    start = time.perf_counter()
    _, described = one_epoch(cfg("distill", sizes[0], "auto"), splits, teacher)
    assert described["teacher_source"] == "cache", described
    build_s = described["teacher_cache_build_s"]
    cache_dir = Path(described["teacher_cache_dir"])
    cache_bytes = sum(f.stat().st_size for f in cache_dir.iterdir())
    print(f"region cache build: {build_s:.1f} s for {len(splits.train)} images x {k} regions "
          f"({cache_bytes / 2**20:.2f} MiB in {cache_dir}); first cached run incl. build "
          f"{time.perf_counter() - start:.1f} s")
    modes = {"supervised": lambda s: (cfg("train", s), None),
             "online": lambda s: (cfg("distill", s, "off"), teacher),
             "cached": lambda s: (cfg("distill", s, "auto"), teacher)}
    times: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):
        for size in sizes:
            for mode in (list(modes) if rep % 2 == 0 else list(reversed(modes))):
                c, t = modes[mode](size)
                seconds, d = one_epoch(c, splits, t)
                if mode != "supervised":
                    assert d["teacher_source"] == ("cache" if mode == "cached" else "online"), d
                times.setdefault((mode, size), []).append(seconds)
    report(times, sizes, len(splits.train) // args.batch_size, args.reps, modes)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"cache build (one-off): {build_s:.1f} s = "
          f"{build_s / statistics.median(times[('online', sizes[0])]):.1f} online epochs at {sizes[0]} px")
    print_ratios(times, sizes)


def report(times: dict[tuple[str, int], list[float]], sizes: list[int], steps: int, reps: int, modes) -> None:
    print(f"\n{reps} epochs of {steps} steps per mode; seconds per epoch (median, then each epoch):")
    print(f"{'size':>5} {'mode':>11} {'epoch s':>9} {'ms/step':>8}   all epochs")
    for size in sizes:
        for mode in modes:
            v = times[(mode, size)]
            med = statistics.median(v)
            print(f"{size:>5} {mode:>11} {med:>9.2f} {1000 * med / steps:>8.1f}   " + " ".join(f"{x:.2f}" for x in v))


def print_ratios(times: dict[tuple[str, int], list[float]], sizes: list[int]) -> None:
    # each ratio: the median over repetitions of the ratio of epochs run back to back, so that the
    # machine's load, which drifts over seconds, cancels as far as it can
    def ratio(mode: str, size: int) -> float:
        pairs = zip(times[(mode, size)], times[("supervised", size)])
        return statistics.median(a / b for a, b in pairs)

    for size in sizes:
        print(f"online/supervised at {size} px: {ratio('online', size):.2f}")
        print(f"cached/supervised at {size} px: {ratio('cached', size):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=default_dataset())
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--views-per-image", default="8")
    p.add_argument("--sizes", default=None, help="student sizes (default: 7,14; imagefolder: 16)")
    p.add_argument("--reps", type=int, default=7, help="epochs timed per mode (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--folder-images", type=int, default=1024, help="imagefolder: generated training images")
    p.add_argument("--crop", type=int, default=64, help="imagefolder: the crop = the teacher's input size")
    p.add_argument("--teacher-model", default="resnet18", help="imagefolder: the teacher network")
    p.add_argument("--student", default="resnet18", help="imagefolder: the student network")
    p.add_argument("--num-workers", type=int, default=1, help="imagefolder: DataLoader workers")
    p.add_argument("--accelerator", default="cpu", help="imagefolder: cpu or gpu (Lightning's accelerator)")
    p.add_argument("--precision", default="32", help="imagefolder: 32 or bf16-mixed (Lightning's precision)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "imagefolder":
        args.sizes = args.sizes or "16"
        folder_main(args)
        return
    sizes = [int(s) for s in (args.sizes or "7,14").split(",")]
    splits = load_dataset(args.dataset, train_samples=args.train_samples)
    info = splits.info
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; dataset {args.dataset}, {len(splits.train)} training images, "
          f"batch {args.batch_size}")
    tmp = Path(tempfile.mkdtemp(prefix="cqkd-bench-"))
    make_teacher(tmp / "teacher", args.dataset, info.channels, info.num_classes)
    teacher = load_teacher(str(tmp / "teacher"), info)

    def cfg(kind: str, size: int, cache: str = "auto") -> RunConfig:
        raw = dict(kind=kind, dataset=args.dataset, train_samples=args.train_samples, model="cnn-small", size=size,
                   epochs=1, batch_size=args.batch_size, schedule="onecycle", accelerator="cpu",
                   views_per_image=args.views_per_image)
        if kind == "distill":
            raw.update(teacher=str(tmp / "teacher"), teacher_cache=cache, temperature=4.0, alpha=0.5)
        return RunConfig.from_dict(raw)

    # the one-off cache build (the student size does not enter the cache key)
    start = time.perf_counter()
    _, described = one_epoch(cfg("distill", sizes[0], "auto"), splits, teacher)
    build_s = described["teacher_cache_build_s"]
    print(f"cache build: {build_s:.1f} s for {len(splits.train)} images x {described['views_per_image']} views "
          f"({described.get('teacher_cache_dir')}); first cached run incl. build {time.perf_counter() - start:.1f} s")
    assert described["teacher_source"] == "cache", described

    modes = {"supervised": lambda s: (cfg("train", s), None),
             "online": lambda s: (cfg("distill", s, "off"), teacher),
             "cached": lambda s: (cfg("distill", s, "auto"), teacher)}
    times: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.reps):
        for size in sizes:
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))  # no mode always runs first
            for mode in order:
                c, t = modes[mode](size)
                seconds, d = one_epoch(c, splits, t)
                if mode != "supervised":
                    assert d["teacher_source"] == ("cache" if mode == "cached" else "online"), d
                times.setdefault((mode, size), []).append(seconds)
    data = {size: data_path_epoch(cfg("train", size), splits) for size in sizes}

    steps = len(splits.train) // args.batch_size
    print(f"\n{args.reps} epochs of {steps} steps per mode; seconds per epoch (median, then each epoch):")
    print(f"{'size':>5} {'mode':>11} {'epoch s':>9} {'ms/step':>8}   all epochs")
    med = {k: statistics.median(v) for k, v in times.items()}
    for size in sizes:
        for mode in modes:
            v = times[(mode, size)]
            print(f"{size:>5} {mode:>11} {med[(mode, size)]:>9.2f} {1000 * med[(mode, size)] / steps:>8.1f}   "
                  + " ".join(f"{x:.2f}" for x in v))
        fetch, prep = data[size]
        print(f"{size:>5} {'data path':>11}  fetch {fetch:.3f} s, fetch+views+degrade {prep:.3f} s per epoch "
              f"= {100 * prep / med[('supervised', size)]:.0f}% of a supervised epoch")
    print(f"cache build (one-off): {build_s:.1f} s = {build_s / med[('online', sizes[0])]:.1f} online epochs at "
          f"{sizes[0]} px")
    print_ratios(times, sizes)


if __name__ == "__main__":
    main()
