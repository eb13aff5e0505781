"""Inference cost of a low-resolution student against its full-resolution teacher, in PyTorch and onnxruntime.

FLOPs per image (``count_flops``: a multiply-add counts as 2), and CPU latency and images/s at
batch 1 and 256 with one thread and with all cores, for ``cnn-large`` at 28 px (the teacher) and
``cnn-small`` at 28, 14 and 7 px (1 channel, 10 classes), and unless ``--skip-resnet`` for
``resnet50`` at 224 px (the teacher) and ``resnet18``/``resnet50`` at 224-28 px (3 channels, 1000
classes). Random weights (seed 0). PyTorch runs under ``torch.inference_mode``; onnxruntime runs
the model written by ``cqkd.deploy.export.export_onnx``. The two are timed side by side: calls
alternate between them (each timed call after an untimed one) until the budget is spent, so that
a machine's load affects both alike. Latency = median timed call; speed-up = teacher latency /
row latency in the same runtime; ort/torch = PyTorch latency / onnxruntime latency::

    PYTHONPATH=src python benchmarks/inference_cost.py [--budget 4] [--threads 1,all] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cqkd.deploy.export import export_onnx, onnx_session
from cqkd.nets.registry import build_model, count_flops

CNN = dict(channels=1, classes=10, teacher=("cnn-large", 28),
           rows=[("cnn-large", 28), ("cnn-small", 28), ("cnn-small", 14), ("cnn-small", 7)])
RESNET = dict(channels=3, classes=1000, teacher=("resnet50", 224),
              rows=[(m, s) for m in ("resnet50", "resnet18") for s in (224, 112, 56, 28)])
BACKENDS = ("torch", "onnxruntime")


def side_by_side(calls: dict[str, Callable[[], object]], budget_s: float, max_reps: int) -> dict[str, tuple[float, int]]:
    """Median seconds per call of each function, measured alternately: rounds in which each function
    runs twice and only its second call is timed (the first absorbs the other runtime's idle
    threads still spinning), until the budget is spent (at least one round)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent, rounds = 0.0, 0
    while rounds == 0 or (spent < budget_s and rounds < max_reps):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            start = time.perf_counter()
            call()
            end = time.perf_counter()
            times[name].append(end - start)
            spent += end - begin
        rounds += 1
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def thread_counts(spec: str) -> list[int]:
    """'1,all' -> [1, number of CPU cores]."""
    cores = os.cpu_count() or 1
    return [cores if t.strip() == "all" else int(t) for t in spec.split(",")]


def measure_group(group: dict, threads: list[int], batch: int, budget: float, workdir: Path) -> dict:
    """{(model, size, threads, backend, batch): seconds per call} plus FLOPs and parity per model."""
    results: dict = {"flops": {}, "parity": {}, "reps": {}}
    c, k = group["channels"], group["classes"]
    for name, size in group["rows"]:
        torch.manual_seed(0)
        model = build_model(name, k, c, size).eval()
        results["flops"][(name, size)] = count_flops(model, c, size)
        path = workdir / f"{name}-{size}.onnx"
        export_onnx(model, torch.rand(2, c, size, size), path, input_name="input")
        x1, xb = torch.rand(1, c, size, size), torch.rand(batch, c, size, size)
        for t in threads:
            torch.set_num_threads(t)
            session = onnx_session(path, threads=t)
            for b, x in ((1, x1), (batch, xb)):
                feed = {"input": x.numpy()}

                def run_torch(x: torch.Tensor = x) -> object:
                    with torch.inference_mode():
                        return model(x)

                calls = {"torch": run_torch, "onnxruntime": lambda feed=feed: session.run(None, feed)}
                timed = side_by_side(calls, budget if b > 1 else budget / 4, max_reps=20 if b > 1 else 50)
                for backend, (seconds, reps) in timed.items():
                    results[(name, size, t, backend, b)] = seconds
                    results["reps"][(name, size, t, backend, b)] = reps
            with torch.inference_mode():
                diff = (torch.from_numpy(session.run(None, {"input": xb.numpy()})[0]) - model(xb)).abs().max()
            results["parity"][(name, size)] = float(diff)
        del model, xb
    return results


def print_group(group: dict, res: dict, threads: list[int], batch: int) -> None:
    tname, tsize = group["teacher"]
    for t in threads:
        print(f"\nteacher {tname} at {tsize} px ({group['channels']} channel(s), {group['classes']} classes); "
              f"{t} thread(s); speed-up = teacher latency / row latency (same runtime)")
        print(f"{'model':>10} {'size':>4} {'MFLOPs':>8} {'runtime':>11} {'b1 ms':>8} {'b1 img/s':>9} "
              f"{'speed-up':>8} {f'b{batch} ms':>9} {f'b{batch} img/s':>10} {'speed-up':>8} "
              f"{'ort/torch':>9} {'reps':>7}")
        for name, size in group["rows"]:
            for backend in BACKENDS:
                l1, lb = res[(name, size, t, backend, 1)], res[(name, size, t, backend, batch)]
                r1, rb = res[(tname, tsize, t, backend, 1)] / l1, res[(tname, tsize, t, backend, batch)] / lb
                vs = (f"{res[(name, size, t, 'torch', 1)] / l1:.2f}/{res[(name, size, t, 'torch', batch)] / lb:.2f}"
                      if backend == "onnxruntime" else "")
                reps = f"{res['reps'][(name, size, t, backend, 1)]}/{res['reps'][(name, size, t, backend, batch)]}"
                print(f"{name:>10} {size:>4} {res['flops'][(name, size)] / 1e6:>8.1f} {backend:>11} {1000 * l1:>8.3f} "
                      f"{1 / l1:>9.0f} {r1:>8.2f} {1000 * lb:>9.1f} {batch / lb:>10.0f} {rb:>8.2f} {vs:>9} {reps:>7}")


def print_summary(group: dict, res: dict, threads: list[int], batch: int) -> None:
    """Student/teacher throughput ratios in both runtimes, side by side."""
    tname, tsize = group["teacher"]
    students = [r for r in group["rows"] if r != group["teacher"]]
    print(f"\nstudent images/s / teacher ({tname}@{tsize}) images/s, measured side by side "
          "(torch | onnxruntime):")
    print(f"{'threads':>7} {'batch':>5} " + " ".join(f"{f'{n}@{s}':>22}" for n, s in students))
    for t in threads:
        for b in (1, batch):
            cells = []
            for n, s in students:
                ratios = [res[(tname, tsize, t, be, b)] / res[(n, s, t, be, b)] for be in BACKENDS]
                cells.append(f"{ratios[0]:>10.2f} | {ratios[1]:>9.2f}")
            print(f"{t:>7} {b:>5} " + " ".join(cells))
    worst = max(res["parity"].values())
    print(f"onnxruntime vs torch on the same random inputs: max |Δlogit| = {worst:.2e} over these models")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per configuration (both runtimes)")
    p.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = every CPU core")
    p.add_argument("--batch", type=int, default=256, help="the large batch size")
    p.add_argument("--skip-resnet", action="store_true", help="only the small CNNs (the ResNets take tens of minutes on a CPU)")
    args = p.parse_args()
    import onnxruntime

    threads = thread_counts(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; threads {threads}; latency = median wall time per call")
    groups = [CNN] + ([] if args.skip_resnet else [RESNET])
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            res = measure_group(group, threads, args.batch, args.budget, Path(tmp))
            print_group(group, res, threads, args.batch)
            print_summary(group, res, threads, args.batch)


if __name__ == "__main__":
    main()
