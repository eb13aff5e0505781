"""What does a low-resolution student save at inference, compared with its full-resolution teacher?

FLOPs per image (``cqkd.models.count_flops``: torch.utils.flop_counter, a multiply-add counts
as 2) and measured CPU latency (eval mode, ``torch.inference_mode``, batch 1 and batch 256) for

- the small CNNs (1 channel, 10 classes): teacher ``cnn-large`` at 28 px, student ``cnn-small``
  at 28, 14 and 7 px;
- torchvision ResNets (3 channels, 1000 classes): teacher ``resnet50`` at 224 px; ``resnet18``
  and ``resnet50`` at 224, 112, 56 and 28 px.

Each row's ratios are against its teacher at full size (``cnn-large`` at 28, ``resnet50`` at
224). Latency is the median of repeated calls after one warm-up call; big configurations get
fewer repetitions (at least one, timed after the warm-up) to stay within a few minutes::

    PYTHONPATH=src python benchmarks/inference_cost.py [--budget 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from cqkd.nets.registry import build_model, count_flops

CNN = dict(channels=1, classes=10, teacher=("cnn-large", 28),
           rows=[("cnn-large", 28), ("cnn-small", 28), ("cnn-small", 14), ("cnn-small", 7)])
RESNET = dict(channels=3, classes=1000, teacher=("resnet50", 224),
              rows=[(m, s) for m in ("resnet50", "resnet18") for s in (224, 112, 56, 28)])


def latency(model: torch.nn.Module, x: torch.Tensor, budget_s: float, max_reps: int = 20) -> tuple[float, int]:
    """Median seconds per forward of ``x``: one warm-up call, then repetitions until the time
    budget is spent (at least one)."""
    with torch.inference_mode():
        model(x)  # warm-up: allocations, oneDNN primitive creation
        times: list[float] = []
        while not times or (sum(times) < budget_s and len(times) < max_reps):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch", type=int, default=256, help="the large batch size")
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; latency = median wall time per forward call")
    groups = [CNN] + ([] if args.skip_resnet else [RESNET])
    header = (f"{'model':>10} {'size':>5} {'MFLOPs/img':>11} {'FLOPs ratio':>11} {'b1 ms':>9} {'b1 ratio':>8} "
              f"{f'b{args.batch} ms':>10} {f'b{args.batch} ratio':>10} {'reps':>7}")
    for group in groups:
        torch.manual_seed(0)
        ref = None
        print(f"\nteacher (ratio = student / teacher): {group['teacher'][0]} at {group['teacher'][1]} px, "
              f"{group['channels']} channel(s), {group['classes']} classes")
        print(header)
        for name, size in group["rows"]:
            model = build_model(name, group["classes"], group["channels"], size).eval()
            flops = count_flops(model, group["channels"], size)
            x1 = torch.rand(1, group["channels"], size, size)
            xb = torch.rand(args.batch, group["channels"], size, size)
            t1, r1 = latency(model, x1, args.budget / 4, max_reps=50)
            tb, rb = latency(model, xb, args.budget)
            if (name, size) == group["teacher"]:
                ref = (flops, t1, tb)
            assert ref is not None, "the teacher row comes first"
            print(f"{name:>10} {size:>5} {flops / 1e6:>11.1f} {flops / ref[0]:>11.4f} {1000 * t1:>9.2f} "
                  f"{t1 / ref[1]:>8.3f} {1000 * tb:>10.1f} {tb / ref[2]:>10.4f} {f'{r1}/{rb}':>7}")
            del model, xb


if __name__ == "__main__":
    main()
