"""How fast is the online teacher's forward pass, and how exact, under each speed setting?

For each teacher (random weights with non-trivial BatchNorm statistics), time one forward call
on a fixed batch, interleaved and repeated, in these settings:

* ``no_grad``: ``torch.no_grad()``, contiguous (NCHW) tensors: cqkd's teacher before this change;
* ``inference``: ``torch.inference_mode()``;
* ``inference+cl``: inference mode and channels-last weights and inputs (cqkd's default now);
* ``compiled``: the latter through ``torch.compile`` (``--teacher-compile``; compile time printed);

and report the median time per call, its ratio to ``no_grad``, and the largest difference of
the logits from ``no_grad`` (absolute, and relative to the largest logit). ``--bf16`` adds the
logits' error under bfloat16 autocast (on this CPU only its accuracy means anything, not its
speed). Usage::

    PYTHONPATH=src python benchmarks/teacher_speed.py --threads 1 [--compile] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cqkd.nets.registry import build_model  # noqa: E402

TEACHERS = {"cnn-large@28": ("cnn-large", 1, 28, 10, 128), "resnet18@64": ("resnet18", 3, 64, 1000, 32),
            "resnet50@224": ("resnet50", 3, 224, 1000, 8)}


def make_teacher(name: str, channels: int, size: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(name, classes, channels, size)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not the identity
        net.train()
        net(torch.rand(16, channels, size, size))
    return net.eval().requires_grad_(False)


def settings(net: torch.nn.Module, x: torch.Tensor, compile_too: bool) -> dict[str, object]:
    """Each setting's forward function on ``x``."""
    cl_net = make_like(net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def no_grad():
        with torch.no_grad():
            return net(x)

    def inference():
        with torch.inference_mode():
            return net(x)

    def inference_cl():
        with torch.inference_mode():
            return cl_net(x_cl)

    out = {"no_grad": no_grad, "inference": inference, "inference+cl": inference_cl}
    if compile_too:
        compiled = torch.compile(cl_net)

        def compiled_fn():
            with torch.inference_mode():
                return compiled(x_cl)

        start = time.perf_counter()
        compiled_fn()
        print(f"  torch.compile: first call (compile) {time.perf_counter() - start:.1f} s", flush=True)
        out["compiled"] = compiled_fn
    return out


def make_like(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--bf16", action="store_true", help="also report the logits' error under bf16 autocast")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    for label in args.teachers:
        name, channels, size, classes, batch = TEACHERS[label]
        net = make_teacher(name, channels, size, classes)
        x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
        print(f"{label}, batch {batch}:", flush=True)
        fns = settings(net, x, args.compile)
        ref = fns["no_grad"]()
        scale = float(ref.abs().max())
        for fn in fns.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        for rep in range(args.reps):
            for key in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
                start = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - start)
        base = statistics.median(times["no_grad"])
        for key, fn in fns.items():
            diff = float((fn() - ref).abs().max())
            med = statistics.median(times[key])
            print(f"  {key:>13}: {1000 * med:8.1f} ms  ({med / base:.2f}x no_grad)  max|dz| {diff:.1e} "
                  f"({diff / scale:.1e} of max|z|)", flush=True)
        if args.bf16:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                z = net(x).float()
            diff = float((z - ref).abs().max())
            p_ref, p_bf = torch.softmax(ref.double(), 1), torch.softmax(z.double(), 1)
            kl = float((p_ref * (p_ref.log() - p_bf.log())).sum(1).max())
            print(f"  {'bf16 autocast':>13}: max|dz| {diff:.1e} ({diff / scale:.1e} of max|z|), "
                  f"max KL(fp32 || bf16) at T=1 {kl:.1e} nats, same top-1 {float((z.argmax(1) == ref.argmax(1)).float().mean()):.3f}")


if __name__ == "__main__":
    main()
