"""How far is a top-k teacher target from the full distribution, for a given teacher?

For a teacher run, the teacher's logits on ``--images`` training images (evaluation view) and,
for each ``--k``, the mean and largest KL( softmax(z/T) || softmax(z_hat/T) ) over those images
at each temperature in ``cqkd.distill.targets.KL_TEMPERATURES`` (z_hat: the top-k logits and
the rest's mass, as ``--teacher-topk k`` stores them), and the mean mass of the kept classes.
The cache's header records the same figures for every view it stores. Usage::

    PYTHONPATH=src python benchmarks/topk_error.py RUN_DIR [--k 1 2 5 10] [--images 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cqkd.core.rundir import RunDir  # noqa: E402
from cqkd.data.registry import load_dataset, make_loader  # noqa: E402
from cqkd.distill.targets import KL_TEMPERATURES, kl_to_full, topk_logits  # noqa: E402
from cqkd.nets.teacher import load_teacher  # noqa: E402
from cqkd.train.module import Normalize  # noqa: E402
from cqkd.views.augment import to_float  # noqa: E402


def teacher_logits(run_dir: str, images: int) -> torch.Tensor:
    cfg = RunDir(run_dir).config()
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.train_samples, cfg.val_size, crop_size=cfg.crop_size)
    teacher = load_teacher(run_dir, splits.info)
    normalize = Normalize(teacher.mean, teacher.std)
    split = splits.train.subset(torch.arange(min(images, len(splits.train))))
    if hasattr(split, "augment"):
        split.augment = False  # image folders: the evaluation crop
    out = []
    with torch.inference_mode():
        for x, _, _ in make_loader(split, 256, shuffle=False):
            out.append(teacher.model(normalize(to_float(x))).float())
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", metavar="RUN_DIR")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()
    z = teacher_logits(args.teacher, args.images)
    print(f"teacher {args.teacher}: {len(z)} images, {z.shape[1]} classes")
    print(f"{'k':>4} {'kept mass':>10} " + " ".join(f"{'KL T=' + format(t, 'g'):>21}" for t in KL_TEMPERATURES))
    print(f"{'':>4} {'(mean)':>10} " + " ".join(f"{'mean / max (nats)':>21}" for _ in KL_TEMPERATURES))
    for k in args.k:
        if k >= z.shape[1]:
            continue
        z_hat = topk_logits(z, k)
        kept = torch.softmax(z.double(), 1).topk(k, dim=1).values.sum(1).mean()
        cells = []
        for t in KL_TEMPERATURES:
            kl = kl_to_full(z, z_hat, t)
            cells.append(f"{float(kl.mean()):.2e} / {float(kl.max()):.2e}")
        print(f"{k:>4} {float(kept):>10.4f} " + " ".join(f"{c:>21}" for c in cells))


if __name__ == "__main__":
    main()
