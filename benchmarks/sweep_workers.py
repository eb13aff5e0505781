"""Wall time of one fixed sweep with 1 worker x 2 threads, 2 workers x 1 thread, and 2 Ray workers.

The sweep is a small fixed subset of the Fashion-MNIST study: a cnn-small teacher at 28 px, 3
supervised cnn-small students at 7 px (seeds 0-2) and 4 distilled ones (T = 1, 4; seeds 0-1),
each on the same class-balanced training subset. Each mode runs the whole sweep from scratch in
a fresh directory through the ``cqkd sweep`` command, one mode after another in one invocation,
so that they meet the same machine; the top-1 of every run is compared across modes. Usage::

    PYTHONPATH=src python benchmarks/sweep_workers.py [--data-dir DIR] [--train-samples 2000] [--epochs 1]

The last lines are the wall times and their ratios to the first mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
MODES = {  # name: extra `cqkd sweep` options
    "1 worker x 2 threads": ["--threads-per-worker", "2"],
    "2 workers x 1 thread": ["--workers", "2", "--threads-per-worker", "1"],
    "Ray: 2 workers x 1 CPU": ["--launcher", "ray", "--workers", "2", "--threads-per-worker", "1"],
}


def sweep_spec(data_dir: str, train_samples: int, epochs: int) -> dict:
    """The benchmark's sweep: a small teacher, supervised and distilled 7 px students."""
    return {
        "description": "benchmarks/sweep_workers.py: a fixed subset of the Fashion-MNIST study",
        "base": {"dataset": "fashion-mnist", "data_dir": data_dir, "train_samples": train_samples,
                 "epochs": epochs, "batch_size": 128, "views_per_image": 8, "accelerator": "cpu"},
        "teachers": {"small": {"model": "cnn-small", "size": 28}},
        "supervised": {"model": "cnn-small", "size": 7, "seed": [0, 1, 2]},
        "distill": {"teacher": "small", "model": "cnn-small", "size": 7, "temperature": [1, 4],
                    "teacher_calibration": "none", "alpha": 0.5, "seed": [0, 1]},
    }


def run_mode(spec_file: Path, out: Path, options: list[str]) -> tuple[float, str]:
    """Run the sweep in ``out`` with ``options``: (wall seconds, its last line of output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    env.pop("OMP_NUM_THREADS", None)  # each mode sets its workers' threads
    cmd = [sys.executable, "-m", "cqkd", "sweep", str(spec_file), "--out", str(out), "--quiet", *options]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {out.parent / (out.name + '.log')}")
    return wall, proc.stdout.strip().splitlines()[-1]


def top1(out: Path) -> dict[str, float]:
    """Each run's test top-1 in a finished sweep directory."""
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    return {name: entry["top1"] for name, entry in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    modes = dict(MODES)
    if importlib.util.find_spec("ray") is None:
        print("Ray is not installed (pip install 'cqkd[ray]'): its mode is left out")
        modes.pop("Ray: 2 workers x 1 CPU")
    spec = sweep_spec(args.data_dir, args.train_samples, args.epochs)
    n_runs = 1 + len(spec["supervised"]["seed"]) + 2 * len(spec["distill"]["seed"])
    print(f"sweep_workers: {n_runs} runs (teacher cnn-small 28 px; 3 supervised + 4 distilled cnn-small 7 px), "
          f"fashion-mnist, {args.train_samples} training images, {args.epochs} epoch(s); "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch threads set per worker")
    results: dict[str, tuple[float, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cqkd-sweep-workers-") as tmp:
        spec_file = Path(tmp) / "sweep.yaml"
        spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
        for i, (name, options) in enumerate(modes.items()):
            load = os.getloadavg()[0]
            wall, last = run_mode(spec_file, Path(tmp) / f"mode{i}", options)
            results[name] = (wall, top1(Path(tmp) / f"mode{i}"))
            print(f"  {name}: {wall:.1f} s (1-min load average before: {load:.1f}); {last}")
    base_name, (base, base_top1) = next(iter(results.items()))
    print(f"\n{'mode':<26}{'wall s':>9}{'ratio':>8}{'speed-up':>10}{'max |d top-1|':>15}")
    for name, (wall, scores) in results.items():
        diff = max(abs(scores[k] - base_top1[k]) for k in base_top1)
        print(f"{name:<26}{wall:>9.1f}{wall / base:>8.2f}{base / wall:>10.2f}{diff:>15.4f}")
    print(f"(ratio = wall / wall of '{base_name}'; max |d top-1| over the {n_runs} runs against that mode)")


if __name__ == "__main__":
    main()
