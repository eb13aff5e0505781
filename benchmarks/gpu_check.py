"""GPU check: online CQKD at ImageNet scale, ResNet-50 teacher (224 px) -> ResNet-18 student (56 px).

Runs ``CQKDModule.training_step`` (the code path of a real run) under bf16 autocast on CUDA on
synthetic ImageNet-sized batches (random uint8 3x224x224 images, 1000 classes, copied from
pinned host memory each step as a DataLoader would deliver them), then the same student
trained supervised. Prints the GPU's name, student images/second for both, the cost of the
online teacher, and peak GPU memory (torch.cuda.max_memory_allocated). Exits 0 when every
loss was finite.

    python benchmarks/gpu_check.py                      # 200 steps each, batch 256, bf16
    python benchmarks/gpu_check.py --device cpu --steps 2 --batch-size 4   # smoke test (fp32, 1 warm-up step)

Without CUDA (and without ``--device cpu``) it stops at once with exit code 2. Sized to take
well under 4 minutes on an H100 (model build and cuDNN autotuning included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagenet_cost import make_module, measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="online CQKD ResNet-50@224 -> ResNet-18@56 on one GPU, bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=200, help="timed steps per mode (after the warm-up)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default: 20 on CUDA, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=56, help="student input size")
    p.add_argument("--precision", default=None, choices=["bf16-mixed", "16-mixed", "32"],
                   help="default: bf16-mixed on CUDA, 32 on CPU (bf16 matmuls are very slow on most CPUs)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for both networks")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run on a GPU machine, "
              "or use --device cpu --steps 2 --batch-size 4 for a smoke test.", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*self.log.*")
    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    if args.warmup is None:
        args.warmup = 20 if device.type == "cuda" else 1
    if device.type == "cpu" and precision == "16-mixed":
        precision = "32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        print(f"GPU: {name} ({total:.0f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads); torch {torch.__version__} (smoke mode)")
    print(f"precision {precision}; batch {args.batch_size}; teacher resnet50@224, student resnet18@{args.size}; "
          f"{args.steps} timed steps after {args.warmup} warm-up per mode", flush=True)

    results = {}
    for mode, teacher in (("distill", "resnet50"), ("supervised", None)):
        torch.manual_seed(0)
        module = make_module("resnet18", args.size, teacher)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = measure(module, device, args.batch_size, args.steps, args.warmup, precision,
                    channels_last=args.channels_last)
        results[mode] = r
        mem = f", peak GPU memory {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""
        print(f"{mode:>10}: {r['images_per_s']:9.1f} student images/s ({r['ms_per_step']:.1f} ms/step){mem}",
              flush=True)
        del module
    ratio = results["supervised"]["images_per_s"] / results["distill"]["images_per_s"]
    print(f"online teacher cost: distillation runs at 1/{ratio:.2f} of the supervised student's speed")
    print(f"gpu_check finished in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
