"""Training-step throughput at ImageNet scale: ResNet-18 students, online ResNet-50 teacher.

For each student size S, time full training steps (forward, loss, backward, AdamW step) of
``CQKDModule.training_step`` — the code path of a real run — on random uint8 batches of
3x224x224 images with 1000 classes:

* ``distill``: the student sees the batch degraded to S px; the frozen ResNet-50 teacher runs
  online on the 224 px crop (random weights: the cost does not depend on them);
* ``supervised``: the same student step without a teacher.

Prints student images/second (and ms/step) per mode and size. Examples::

    python benchmarks/imagenet_cost.py --device cpu --batch-size 8 --steps 3
    python benchmarks/imagenet_cost.py --device cuda --precision bf16-mixed --batch-size 256 --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cqkd.core.config import RunConfig  # noqa: E402
from cqkd.data.registry import DatasetInfo  # noqa: E402
from cqkd.nets.registry import build_model  # noqa: E402
from cqkd.nets.teacher import Teacher  # noqa: E402
from cqkd.train.module import CQKDModule  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_module(student: str, size: int, teacher_name: str | None, crop: int = 224,
                num_classes: int = 1000) -> CQKDModule:
    """A CQKDModule as ``fit_run`` would build it for an ImageNet-style folder."""
    info = DatasetInfo("imagefolder", num_classes, 3, crop, IMAGENET_MEAN, IMAGENET_STD, loader_augments=True)
    kind = "distill" if teacher_name else "train"
    cfg = RunConfig.from_dict(dict(kind=kind, dataset="imagefolder", model=student, size=size, crop_size=crop,
                                   teacher=f"random-{teacher_name}" if teacher_name else None,
                                   temperature=10.0, alpha=0.5))
    teacher = None
    if teacher_name:
        t = build_model(teacher_name, num_classes, 3, crop).eval().requires_grad_(False)
        teacher = Teacher(t, "random", teacher_name, crop, IMAGENET_MEAN, IMAGENET_STD)
    return CQKDModule(build_model(student, num_classes, 3, size), cfg, info, teacher)


def measure(module: CQKDModule, device: torch.device, batch_size: int, steps: int, warmup: int,
            precision: str = "32", crop: int = 224, num_classes: int = 1000,
            channels_last: bool = False) -> dict[str, float]:
    """Time ``steps`` training steps after ``warmup`` ones; batches come from pinned host
    memory (CUDA) as a DataLoader would deliver them. Returns images/s, ms/step, peak memory."""
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    module.train()
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x_host = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, generator=g)
    y_host = torch.randint(0, num_classes, (batch_size,), generator=g)
    idx_host = torch.arange(batch_size)
    if device.type == "cuda":
        x_host, y_host = x_host.pin_memory(), y_host.pin_memory()
    if precision in ("bf16-mixed", "16-mixed"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step(i: int) -> float:
        x = x_host.to(device, non_blocking=True)
        y = y_host.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = module.training_step((x, y, idx_host), i)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = step(warmup + i)
    sync()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError("non-finite loss in the benchmark")
    out = {"images_per_s": batch_size * steps / elapsed, "ms_per_step": 1000 * elapsed / steps,
           "cpu_s_per_image": cpu / (batch_size * steps)}  # process CPU time: robust to a busy machine
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 56, 112])
    p.add_argument("--student", default="resnet18")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--modes", nargs="+", default=["distill", "supervised"], choices=["distill", "supervised"])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("imagenet_cost: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*trainer.*")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; precision {args.precision}; batch {args.batch_size}; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("| mode | student | size | teacher | images/s | ms/step | CPU s/image |")
    print("|---|---|---:|---|---:|---:|---:|")
    for mode in args.modes:
        for size in args.sizes:
            torch.manual_seed(0)
            module = make_module(args.student, size, args.teacher if mode == "distill" else None)
            r = measure(module, device, args.batch_size, args.steps, args.warmup, args.precision)
            row = dict(mode=mode, student=args.student, size=size,
                       teacher=f"{args.teacher}@224" if mode == "distill" else "-", **r)
            rows.append(row)
            print(f"| {mode} | {args.student} | {size} | {row['teacher']} | {r['images_per_s']:.1f} | "
                  f"{r['ms_per_step']:.0f} | {r['cpu_s_per_image']:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
