"""A race: knowledge distillation in torchdistill 1.1.5 against cqkd (teacher online, teacher cached).

The same teacher (``cnn-large`` at 28 px, trained here for one epoch by cqkd), the same student
(``cnn-small`` on the 28 px image resized, antialiased, to 7 px; same initial weights), the same
Fashion-MNIST subset (no augmentation), batch size, optimiser (AdamW, lr 1e-3, weight decay
0.01, constant rate), loss (0.5·CE + 0.5·T²·KL at T = 4) and epochs, in

* ``torchdistill``: its ``DistillationBox`` with the ``KDLoss``, the teacher frozen in eval mode,
  the student wrapped as resize -> normalise -> network; run in a separate virtual environment
  that this script makes (``torchdistill==1.1.5`` installed with ``--no-deps``; torch and the
  rest come from this environment through a ``.pth`` file);
* ``cqkd online``: ``CQKDModule`` through Lightning, as ``cqkd distill --teacher-cache off``;
* ``cqkd cached``: the same, reading the teacher's logits from the cache (built once, before).

Each contender trains a fresh student ``--epochs`` epochs per repetition, each run in a fresh
process; the contenders are interleaved and repeated (``--reps``), and each reports training images/s (the training loop
only: no set-up, validation or test). Ratios are medians over repetitions of the ratio of runs
made back to back. Then each student's test top-1 (all 10,000 test images), and that of cqkd
cached with a second seed as a measure of seed-to-seed noise. Usage::

    PYTHONPATH=src python benchmarks/vs_torchdistill.py --threads 1 [--train-samples 10000] [--epochs 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import site
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

TORCHDISTILL = "torchdistill==1.1.5"


# ---------------------------------------------------------------------- shared by both sides

def load_data(setup: dict):
    from cqkd.data.registry import load_dataset

    return load_dataset(setup["dataset"], train_samples=setup["train_samples"])


def top1(forward, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Test top-1 of ``forward`` (float 28 px images in [0, 1] -> logits), in eval mode."""
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            z = forward(images[s:s + batch].float() / 255)
            correct += int((z.argmax(1) == labels[s:s + batch]).sum())
    return correct / len(images)


def student_net(setup: dict, info) -> nn.Module:
    """The student network, initialised as cqkd initialises it (``build_student``)."""
    import lightning as L

    from cqkd.nets.registry import build_model

    L.seed_everything(setup["seed"], verbose=False)
    return build_model("cnn-small", info.num_classes, info.channels, setup["size"])


# ---------------------------------------------------------------------- torchdistill (in its own venv)

class Degrade(nn.Module):
    """cqkd's degradation (antialiased bilinear resize) as a module, for torchdistill's student."""

    def __init__(self, size: int) -> None:
        super().__init__()
        from cqkd.views.degrade import Degradation

        self.degradation = Degradation(size=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.degradation(x)


def run_torchdistill(setup: dict) -> dict:
    """One torchdistill KD run; returns its training time, images/s and test top-1."""
    import torchdistill
    from torchdistill.core.distillation import get_distillation_box

    from cqkd.nets.registry import build_model
    from cqkd.nets.teacher import load_weights
    from cqkd.train.module import Normalize

    splits = load_data(setup)
    info = splits.info
    net = build_model("cnn-large", info.num_classes, info.channels, 28)
    load_weights(net, Path(setup["teacher_weights"]))
    teacher = nn.Sequential(Normalize(info.mean, info.std), net).eval()
    student = nn.Sequential(Degrade(setup["size"]), Normalize(info.mean, info.std), student_net(setup, info))
    train = torch.utils.data.TensorDataset(splits.train.images.float() / 255, splits.train.labels)
    kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
          "teacher_module_io": "output", "temperature": setup["temperature"], "alpha": setup["alpha"]}
    config = {
        "num_epochs": setup["epochs"],
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler,
                                                                  "kwargs": {}},
                              "kwargs": {"batch_size": setup["batch_size"], "num_workers": 0, "drop_last": True}},
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": setup["lr"], "weight_decay": setup["weight_decay"]}},
        "criterion": {"key": "WeightedSumLoss",
                      "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }
    box = get_distillation_box(teacher, student, {"train": train}, config, torch.device("cpu"), None, False, 1)
    steps = 0
    start = time.perf_counter()
    for epoch in range(setup["epochs"]):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            steps += 1
        box.post_epoch_process()
    seconds = time.perf_counter() - start
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student.eval()
    return {"seconds": seconds, "images_per_s": steps * setup["batch_size"] / seconds, "steps": steps,
            "top1": top1(student, splits.test.images, splits.test.labels), "version": torchdistill.__version__}


def make_env(root: Path) -> Path:
    """A virtual environment with torchdistill 1.1.5 that uses this environment's torch (no copy of it)."""
    python = root / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "cqkd-env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                        "--disable-pip-version-check", TORCHDISTILL], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"vs_torchdistill: cannot install {TORCHDISTILL} into {root}:\n{r.stderr[-2000:]}")
    return python


def run_once(python: Path, setup_file: Path, contender: str, threads: int | None) -> dict:
    """One run of ``contender`` in a fresh process (``python``: torchdistill's environment or this one)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [str(python), __file__, "--worker", str(setup_file), "--contender", contender]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        args += ["--threads", str(threads)]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"vs_torchdistill: the {contender} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- cqkd

def train_teacher(out: Path, setup: dict) -> None:
    from cqkd.core.config import RunConfig
    from cqkd.train.fit import fit_run

    cfg = RunConfig.from_dict(dict(kind="train", dataset=setup["dataset"], train_samples=setup["train_samples"],
                                   model="cnn-large", size=28, epochs=1, batch_size=setup["batch_size"],
                                   augment="none", accelerator="cpu", seed=0))
    fit_run(cfg, out, progress=False, quiet=True)


def run_cqkd(setup: dict, cache: str, seed: int | None = None) -> dict:
    """One cqkd distillation run through Lightning (as ``cqkd distill``, without validation)."""
    import lightning as L

    from cqkd.core.config import RunConfig
    from cqkd.data.registry import make_loader
    from cqkd.nets.teacher import load_teacher
    from cqkd.train.module import CQKDModule
    from cqkd.train.setup import make_trainer

    setup = {**setup, "seed": setup["seed"] if seed is None else seed}
    splits = load_data(setup)
    cfg = RunConfig.from_dict(dict(
        kind="distill", dataset=setup["dataset"], train_samples=setup["train_samples"], model="cnn-small",
        size=setup["size"], epochs=setup["epochs"], batch_size=setup["batch_size"], lr=setup["lr"],
        weight_decay=setup["weight_decay"], optimizer="adamw", schedule="constant", augment="none",
        teacher=setup["teacher"], temperature=setup["temperature"], alpha=setup["alpha"], teacher_cache=cache,
        seed=setup["seed"], accelerator="cpu"))
    teacher = load_teacher(cfg.teacher, splits.info)
    module = CQKDModule(student_net(setup, splits.info), cfg, splits.info, teacher, train_data=splits.train)

    class Timer(L.Callback):
        seconds = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            Timer.seconds += time.perf_counter() - self.start

    Timer.seconds = 0.0
    trainer = make_trainer(cfg, None, progress=False, quiet=True, callbacks=[Timer()], limit_val_batches=0,
                           enable_checkpointing=False, logger=False)
    loader = make_loader(splits.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed)
    trainer.fit(module, loader)
    source = module.source.describe()
    assert source["teacher_source"] == ("cache" if cache == "auto" else "online"), source
    module.eval()
    steps = trainer.global_step
    return {"seconds": Timer.seconds, "images_per_s": steps * cfg.batch_size / Timer.seconds, "steps": steps,
            "top1": top1(module.student_forward, splits.test.images, splits.test.labels),
            "build_s": source["teacher_cache_build_s"]}


def teacher_forward_times(setup: dict, reps: int = 9) -> tuple[float, float]:
    """Median seconds of one teacher forward on a batch: torchdistill's way (``no_grad``, NCHW) and
    cqkd's (``CQKDModule.teacher_forward``), interleaved in this process."""
    from cqkd.core.config import RunConfig
    from cqkd.nets.registry import build_model
    from cqkd.nets.teacher import load_teacher
    from cqkd.train.module import CQKDModule, Normalize

    splits = load_data({**setup, "train_samples": setup["batch_size"]})
    info = splits.info
    teacher = load_teacher(setup["teacher"], info)
    plain = build_model("cnn-large", info.num_classes, info.channels, 28)
    plain.load_state_dict(teacher.model.state_dict())
    plain = nn.Sequential(Normalize(info.mean, info.std), plain).eval()
    cfg = RunConfig.from_dict(dict(kind="distill", dataset=setup["dataset"], model="cnn-small", size=setup["size"],
                                   teacher=setup["teacher"], augment="none"))
    module = CQKDModule(student_net(setup, info), cfg, info, teacher)
    x = splits.train.images[: setup["batch_size"]].float() / 255

    def plain_forward() -> torch.Tensor:
        with torch.no_grad():
            return plain(x)

    fns = {"plain": plain_forward, "cqkd": lambda: module.teacher_forward(x)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for name in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
            start = time.perf_counter()
            fns[name]()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["plain"]), statistics.median(times["cqkd"])


# ---------------------------------------------------------------------- the race

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="SETUP", help=argparse.SUPPRESS)
    p.add_argument("--contender", default="torchdistill", help=argparse.SUPPRESS)
    p.add_argument("--train-samples", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--teacher", metavar="RUN_DIR", help="a cnn-large teacher run (default: train one for an epoch)")
    p.add_argument("--env", metavar="DIR", help="where to make torchdistill's environment (default: a temporary one)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        setup = json.loads(Path(args.worker).read_text())
        result = (run_torchdistill(setup) if args.contender == "torchdistill" else
                  run_cqkd(setup, "off" if args.contender == "online" else "auto"))
        print(json.dumps(result))
        return
    from cqkd.data.fashion_mnist import DEBIAN_FASHION_MNIST

    tmp = Path(tempfile.mkdtemp(prefix="cqkd-race-"))
    start = time.perf_counter()
    python = make_env(Path(args.env) if args.env else tmp / "torchdistill-env")
    print(f"torchdistill environment: {python.parent.parent} ({time.perf_counter() - start:.1f} s to make)")
    teacher = Path(args.teacher) if args.teacher else tmp / "teacher"
    if not args.teacher:
        start = time.perf_counter()
        setup0 = {"dataset": "fashion-mnist", "train_samples": args.train_samples, "batch_size": args.batch_size}
        train_teacher(teacher, setup0)
        print(f"teacher: cnn-large @ 28 px trained 1 epoch by cqkd in {time.perf_counter() - start:.0f} s")
    setup = {"dataset": "fashion-mnist", "train_samples": args.train_samples, "epochs": args.epochs,
             "batch_size": args.batch_size, "size": args.size, "lr": 1e-3, "weight_decay": 0.01,
             "temperature": 4.0, "alpha": 0.5, "seed": 0, "teacher": str(teacher),
             "teacher_weights": str(teacher / "model.safetensors")}
    setup_file = tmp / "setup.json"
    setup_file.write_text(json.dumps(setup))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; data {DEBIAN_FASHION_MNIST}, "
          f"{args.train_samples} training images x {args.epochs} epoch(s), batch {args.batch_size}, 28 -> "
          f"{args.size} px")
    first = run_cqkd(setup, "auto")  # builds the cache (one view per image: no augmentation)
    built = f"{first['build_s']:.1f} s" if first["build_s"] else "none (the teacher's cache was already there)"
    print(f"cqkd cache build (one-off, once per teacher): {built}")

    # every run in a fresh process of its own, so that no contender inherits another's state
    contenders = {"torchdistill": lambda: run_once(python, setup_file, "torchdistill", args.threads),
                  "cqkd online": lambda: run_once(Path(sys.executable), setup_file, "online", args.threads),
                  "cqkd cached": lambda: run_once(Path(sys.executable), setup_file, "cached", args.threads)}
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    for rep in range(args.reps):
        for name in (list(contenders) if rep % 2 == 0 else list(reversed(contenders))):
            results[name].append(contenders[name]())
    noise = run_cqkd(setup, "auto", seed=1)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\n{'contender':>14} {'images/s':>9} {'train s':>8}   images/s of each repetition   test top-1")
    for name, runs in results.items():
        ips = [r["images_per_s"] for r in runs]
        print(f"{name:>14} {statistics.median(ips):>9.0f} {statistics.median(r['seconds'] for r in runs):>8.2f}   "
              + " ".join(f"{v:.0f}" for v in ips) + f"   {runs[0]['top1']:.4f}")
    print(f"{'(seed noise)':>14} cqkd cached with seed 1: test top-1 {noise['top1']:.4f}")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x["images_per_s"] / y["images_per_s"] for x, y in zip(results[a], results[b]))

    plain, cqkd = teacher_forward_times(setup)
    print(f"teacher forward alone, batch {args.batch_size}, side by side: no_grad NCHW (torchdistill's way) "
          f"{1000 * plain:.0f} ms, cqkd (inference mode, channels-last) {1000 * cqkd:.0f} ms: {plain / cqkd:.2f}x")
    print(f"cqkd online / torchdistill: {ratio('cqkd online', 'torchdistill'):.2f}x")
    print(f"cqkd cached / torchdistill: {ratio('cqkd cached', 'torchdistill'):.2f}x")


if __name__ == "__main__":
    main()
