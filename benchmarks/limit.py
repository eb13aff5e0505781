"""Performance against the limit: one cqkd training epoch next to a bare PyTorch loop doing the same work.

For the same model (``cnn-small``, initialised from the seed), data (a fixed class-balanced
Fashion-MNIST subset, or the synthetic data when Fashion-MNIST is absent), batch size, views
(cqkd's default ``flip,translate=2`` bank, drawn per step from ``step_generator``), degradation
(antialiased bilinear resize to ``--sizes``), optimiser (AdamW, one-cycle schedule over the run)
and loss, it times one training epoch of

* ``bare``: a loop written here: uint8 tensors in memory, a ``randperm`` per epoch, the same
  functions from ``cqkd.views`` (``ViewBank``, ``apply_views``, ``to_float``, ``Degradation``),
  no Lightning, no logging. Three variants: ``bare sup`` (cross-entropy), ``bare cached`` (the
  KD loss on teacher logits held in a tensor in memory, looked up per sample and view) and
  ``bare online`` (the KD loss on a teacher forward per step: inference mode, channels-last,
  as cqkd runs it): the practical limit of this machine for each mode;
* ``cqkd``: ``supervised``, ``cached`` and ``online`` runs through ``cqkd.train.fit.fit_run``,
  exactly as ``cqkd train`` / ``cqkd distill [--teacher-cache off]`` run them (validation, test
  and the run directory included; only the training epoch is timed, by a Lightning callback
  added to the Trainer that ``fit_run`` makes).

Every run is a fresh process (``--worker``); the six contenders are interleaved (alternating
order) and repeated (``--reps``). The timed span of an epoch runs from its first batch being
fetched to its last optimiser step, in wall seconds and in CPU seconds of the process
(``time.process_time``; with one thread the CPU time is the work done, and it is much less
disturbed than wall time when other jobs share the machine). Printed per size: median seconds per
epoch, the median of the per-pair ratios ``cqkd/bare`` (runs made back to back; CPU and wall), the
share of the bare epoch spent in
the student's forward+backward (forward, loss, backward; timed in the bare loop), the
teacher's share in ``bare online``, and each contender's peak resident memory (``ru_maxrss``
of the child). ``--profile MODE`` instead runs one cqkd epoch of MODE under cProfile and prints
the functions with the most cumulative and own time. Usage::

    PYTHONPATH=src python benchmarks/limit.py --threads 1 [--train-samples 10000] [--reps 3] [--sizes 7 14]
    PYTHONPATH=src python benchmarks/limit.py --threads 1 --profile supervised --sizes 7
    PYTHONPATH=src python benchmarks/limit.py --threads 1 --channels-last   # both loops with a channels-last student
    PYTHONPATH=src python benchmarks/limit.py --threads 1 --before 0f10e42  # also cqkd as of 0f10e42, interleaved

``--before REV`` unpacks ``src/`` of git revision REV (``git archive``) and runs cqkd's modes on it too,
as contenders ``MODE@REV`` interleaved with the others, and prints their ratios to the bare loop and the
median of the per-pair ratios ``now/REV``: the before and after of a change in one run, under one load.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _src_dir() -> Path:
    """The cqkd tree this process imports: this checkout's, or a worker's ``--src`` (``--before REV``)."""
    return Path(sys.argv[sys.argv.index("--src") + 1]) if "--src" in sys.argv[:-1] else ROOT / "src"


sys.path.insert(0, str(_src_dir()))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CQKD_MODES = ("supervised", "cached", "online")
BARE = {"supervised": "bare sup", "cached": "bare cached", "online": "bare online"}


def dataset_name() -> str:
    """fashion-mnist where cqkd finds it, else the synthetic data."""
    from cqkd.data.registry import load_dataset

    try:
        load_dataset("fashion-mnist", train_samples=10)
        return "fashion-mnist"
    except Exception as e:  # noqa: BLE001 - absent, no download: fall back
        print(f"fashion-mnist not available ({type(e).__name__}: {e}); synthetic data instead")
        return "synthetic"


def run_config(setup: dict, mode: str):
    """The RunConfig of a cqkd run in ``mode`` (supervised, cached or online) at ``setup['size']`` px."""
    from cqkd.core.config import RunConfig

    d = dict(kind="train" if mode == "supervised" else "distill", dataset=setup["dataset"],
             train_samples=setup["train_samples"], model="cnn-small", size=setup["size"], epochs=setup["epochs"],
             batch_size=setup["batch_size"], seed=setup["seed"], accelerator="cpu")
    if setup.get("channels_last"):
        d["channels_last"] = True  # only where asked: a tree from before the option refuses the key
    if mode != "supervised":
        d.update(teacher=setup["teacher"], teacher_cache="auto" if mode == "cached" else "off")
    return RunConfig.from_dict(d)


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` where /proc has it, since Linux's
    ``ru_maxrss`` survives ``execve`` and so would report the (forking) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------- (a) the bare loop

def run_bare(setup: dict, mode: str) -> dict:
    """One bare epoch(s) of ``mode``: the same work as cqkd's step, written out."""
    from cqkd.data.registry import load_dataset
    from cqkd.nets.registry import build_model
    from cqkd.nets.teacher import load_teacher
    from cqkd.views.augment import BANK_SEED, ViewBank, apply_views, step_generator, to_float
    from cqkd.views.degrade import upsample_to

    cfg = run_config(setup, mode)
    splits = load_dataset(cfg.dataset, train_samples=cfg.train_samples)
    info, train = splits.info, splits.train
    images, labels = train.images, train.labels
    degrade = cfg.degradation_spec()
    bank = ViewBank(cfg_views(cfg), len(train), cfg.views_per_image, BANK_SEED)
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, info.num_classes, info.channels, degrade.output_size(info.image_size)).train()
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    teacher = z_cache = None
    if mode == "online":
        t = load_teacher(cfg.teacher, info)
        teacher = t.model.eval().to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_mean, t_std = torch.tensor(t.mean).view(1, -1, 1, 1), torch.tensor(t.std).view(1, -1, 1, 1)
    elif mode == "cached":  # the teacher's logits on every bank view, in memory (values do not change the cost)
        z_cache = torch.randn(len(train) * bank.k, info.num_classes, generator=torch.Generator().manual_seed(0))
    n, b = len(train), cfg.batch_size
    drop_last = n > b
    steps_per_epoch = n // b if drop_last else -(-n // b)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps_per_epoch * cfg.epochs, 1))
    T, alpha = float(cfg.temperature), cfg.alpha
    order_g = torch.Generator().manual_seed(cfg.seed)
    fb = teacher_s = 0.0
    step = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order_g)
        for s in range(steps_per_epoch):
            idx = perm[s * b:(s + 1) * b]
            x, y = images[idx], labels[idx]
            g = step_generator(cfg.seed, step)
            which = bank.draw(len(idx), g)
            x_hr = to_float(apply_views(x, bank.params(idx, which)))
            z_t = None
            if teacher is not None:
                t0 = time.process_time()
                with torch.inference_mode():
                    xt = upsample_to(x_hr, t.input_size)
                    z_t = teacher(((xt - t_mean) / t_std).contiguous(memory_format=torch.channels_last)).float()
                z_t = z_t.clone()
                teacher_s += time.process_time() - t0
            elif z_cache is not None:
                z_t = z_cache[idx * bank.k + which]
            x_lr = ((degrade(x_hr, g) - mean) / std).contiguous(memory_format=layout)
            t0 = time.process_time()
            z_s = model(x_lr)
            ce = F.cross_entropy(z_s, y)
            if z_t is None:
                loss = ce
            else:
                kl = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), reduction="batchmean",
                              log_target=True)
                loss = (1 - alpha) * ce + alpha * T * T * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            fb += time.process_time() - t0
            opt.step()
            sched.step()
            step += 1
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    if not torch.isfinite(loss):
        raise SystemExit("limit: the bare loop diverged")
    return {"seconds": seconds, "cpu_s": cpu_s, "steps": step, "fb_s": fb, "teacher_s": teacher_s,
            "rss_mib": peak_rss_mib()}


def cfg_views(cfg):
    """The training views of ``cfg`` (the in-memory datasets' bank spec)."""
    from cqkd.views.augment import ViewSpec

    return ViewSpec.parse(cfg.augment)


# ---------------------------------------------------------------------- (b) cqkd, as `cqkd train/distill` runs it

def run_cqkd(setup: dict, mode: str, out: Path, profile: bool = False) -> dict:
    """One cqkd run of ``mode`` through ``fit_run``; only its training epochs are timed."""
    import lightning as L

    import cqkd.train.fit as fit

    class EpochTimer(L.Callback):
        """Seconds from each epoch's start to its last batch's end (validation and the rest excluded);
        with ``profiler``, that span alone is profiled."""

        def __init__(self, profiler=None) -> None:
            self.seconds = self.cpu_s = 0.0
            self.start = self.end = self.cpu_start = self.cpu_end = 0.0
            self.steps = 0
            self.profiler = profiler

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self.profiler is not None:
                self.profiler.enable()
            self.start = self.end = time.perf_counter()
            self.cpu_start = self.cpu_end = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.end, self.cpu_end = time.perf_counter(), time.process_time()
            self.steps += 1

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self.profiler is not None:
                self.profiler.disable()
            self.seconds += self.end - self.start
            self.cpu_s += self.cpu_end - self.cpu_start

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    timer = EpochTimer(profiler)
    make_trainer = fit.make_trainer

    def timed_trainer(*args, extra_callbacks=None, **kwargs):
        return make_trainer(*args, extra_callbacks=[*(extra_callbacks or []), timer], **kwargs)

    fit.make_trainer = timed_trainer
    cfg = run_config(setup, mode)
    metrics = fit.fit_run(cfg, out, progress=True, **quiet_kwargs(fit.fit_run))  # as `cqkd train` calls it
    if profiler is not None:
        import pstats

        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(30)
    source = metrics.get("teacher_source")
    expected = {"supervised": None, "cached": "cache", "online": "online"}[mode]
    if source != expected:
        raise SystemExit(f"limit: the {mode} run's teacher source is {source!r}, not {expected!r}")
    return {"seconds": timer.seconds, "cpu_s": timer.cpu_s, "steps": timer.steps, "rss_mib": peak_rss_mib(), "top1": metrics["top1"]}


# ---------------------------------------------------------------------- driver

def run_child(setup_file: Path, contender: str, threads: int | None, extra: list[str] = (),
              trees: dict[str, Path] | None = None) -> dict:
    """One run of ``contender`` in a fresh process; ``mode@REV`` runs ``mode`` on the tree of REV in ``trees``."""
    mode, _, rev = contender.partition("@")
    src = (trees or {})[rev] if rev else ROOT / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [sys.executable, __file__, "--worker", str(setup_file), "--contender", mode, "--src", str(src), *extra]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        args += ["--threads", str(threads)]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"limit: the {contender} run failed:\n{r.stderr[-3000:]}")
    if "--profile" in extra:
        print(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def source_tree(rev: str, tmp: Path) -> Path:
    """The ``src`` directory of revision ``rev`` of this repository, unpacked under ``tmp`` (git archive)."""
    dest = tmp / f"tree-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"limit: --before {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def quiet_kwargs(fit_run) -> dict:
    """``quiet=True`` where this tree's ``fit_run`` takes it (trees from before it: no argument)."""
    return {"quiet": True} if "quiet" in inspect.signature(fit_run).parameters else {}


def train_teacher(out: Path, dataset: str, train_samples: int, batch_size: int) -> None:
    from cqkd.core.config import RunConfig
    from cqkd.train.fit import fit_run

    cfg = RunConfig.from_dict(dict(kind="train", dataset=dataset, train_samples=train_samples, model="cnn-large",
                                   size=28, epochs=1, batch_size=batch_size, augment="none", accelerator="cpu",
                                   seed=0))
    fit_run(cfg, out, progress=False, **quiet_kwargs(fit_run))


def worker(args: argparse.Namespace) -> None:
    setup = json.loads(Path(args.worker).read_text())
    name = args.contender
    if name.startswith("bare "):
        mode = {v: k for k, v in BARE.items()}[name]
        result = run_bare(setup, mode)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"cqkd-limit-{name}-", dir=setup["tmp"])) / "run"
        result = run_cqkd(setup, name, out, profile=bool(args.profile))
    print(json.dumps(result))


def report(size: int, results: dict[str, list[dict]], reps: int, revs: list[str] = ()) -> None:
    """Per contender: median wall and CPU seconds per epoch, each repetition, peak RSS; then the ratios."""
    med = statistics.median
    print(f"\n{size} px: one training epoch, median of {reps}: wall s, CPU s (each repetition's CPU s), peak RSS")
    for name, runs in results.items():
        print(f"  {name:>18} {med(r['seconds'] for r in runs):7.2f} {med(r['cpu_s'] for r in runs):7.2f}   ("
              + " ".join(f"{r['cpu_s']:.2f}" for r in runs) + f")   {med(r['rss_mib'] for r in runs):5.0f} MiB")
    for mode in (m for m in CQKD_MODES if m in results):
        print(f"  cqkd/bare {mode:>10}: " + ratios(results[mode], results[BARE[mode]]))
        for rev in revs:
            print(f"  {rev}/bare {mode:>10}: " + ratios(results[f"{mode}@{rev}"], results[BARE[mode]]))
            print(f"  now/{rev} {mode:>10}: " + ratios(results[mode], results[f"{mode}@{rev}"]))
    if "supervised" in results:
        sup = results["bare sup"]
        print(f"  student forward+backward (CPU): {100 * med(r['fb_s'] / r['cpu_s'] for r in sup):.0f}% of the bare "
              f"supervised epoch, {100 * med(r['fb_s'] / c['cpu_s'] for r, c in zip(sup, results['supervised'])):.0f}%"
              " of cqkd's")
    if "online" in results:
        online = results["bare online"]
        print(f"  teacher forward (CPU): {100 * med(r['teacher_s'] / r['cpu_s'] for r in online):.0f}% of the bare "
              "online epoch")


def ratios(cqkd: list[dict], bare: list[dict]) -> str:
    """Medians of the per-pair ratios cqkd/bare, of CPU and of wall seconds, with the CPU pairs."""
    cpu = [c["cpu_s"] / b["cpu_s"] for c, b in zip(cqkd, bare)]
    wall = [c["seconds"] / b["seconds"] for c, b in zip(cqkd, bare)]
    return (f"CPU {statistics.median(cpu):.3f}x (pairs " + " ".join(f"{q:.3f}" for q in cpu)
            + f"), wall {statistics.median(wall):.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="SETUP", help=argparse.SUPPRESS)
    p.add_argument("--contender", default="bare sup", help=argparse.SUPPRESS)
    p.add_argument("--train-samples", type=int, default=10_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sizes", type=int, nargs="+", default=[7, 14])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=list(CQKD_MODES), choices=CQKD_MODES)
    p.add_argument("--teacher", metavar="RUN_DIR", help="a cnn-large teacher run (default: train one for an epoch)")
    p.add_argument("--profile", choices=CQKD_MODES, help="profile one cqkd run of this mode (cProfile) and stop")
    p.add_argument("--before", metavar="REV", help="also run cqkd's modes on the code of git revision REV "
                                                  "(interleaved with the rest): before/after in one run")
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--train-teacher", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true",
                   help="the student in channels-last layout, in the bare loop and in cqkd (--channels-last) alike")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    if args.train_teacher:
        return train_teacher(Path(args.train_teacher), dataset_name(), args.train_samples, args.batch_size)
    if args.before and args.teacher:
        raise SystemExit("limit: --before trains its own teacher with REV's code (a teacher written by this "
                         "checkout may hold config keys that REV does not know): leave out --teacher")
    tmp = Path(tempfile.mkdtemp(prefix="cqkd-limit-"))
    trees = {args.before: source_tree(args.before, tmp)} if args.before else {}
    dataset = dataset_name()
    teacher = Path(args.teacher) if args.teacher else tmp / "teacher"
    if not args.teacher:  # in a child of the oldest tree, so that every tree can read the teacher's run
        src = trees[args.before] if args.before else ROOT / "src"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--train-teacher", str(teacher), "--src", str(src),
                        "--train-samples", str(args.train_samples), "--batch-size", str(args.batch_size)],
                       env={**os.environ, "PYTHONPATH": str(src)}, check=True)
        print(f"teacher: cnn-large @ 28 px trained 1 epoch by cqkd{' ' + args.before if args.before else ''} in "
              f"{time.perf_counter() - start:.0f} s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{dataset}, {args.train_samples} training images x {args.epochs} epoch(s), batch {args.batch_size}"
          + (", student channels-last" if args.channels_last else ""))
    for size in args.sizes:
        setup = {"dataset": dataset, "train_samples": args.train_samples, "epochs": args.epochs,
                 "batch_size": args.batch_size, "size": size, "seed": 0, "teacher": str(teacher), "tmp": str(tmp),
                 "channels_last": args.channels_last}
        setup_file = tmp / f"setup-{size}.json"
        setup_file.write_text(json.dumps(setup))
        if args.profile:
            print(json.dumps(run_child(setup_file, args.profile, args.threads, ["--profile", args.profile])))
            continue
        if "cached" in args.modes:  # builds the cache once (untimed); later cached runs read it
            for rev in ["", *trees]:
                run_child(setup_file, f"cached@{rev}" if rev else "cached", args.threads, trees=trees)
        contenders = [c for m in args.modes for c in (BARE[m], m, *(f"{m}@{rev}" for rev in trees))]
        results: dict[str, list[dict]] = {c: [] for c in contenders}
        for rep in range(args.reps):
            for name in (contenders if rep % 2 == 0 else list(reversed(contenders))):
                results[name].append(run_child(setup_file, name, args.threads, trees=trees))
        print(f"load average after {size} px: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        report(size, results, args.reps, list(trees))
    shutil.rmtree(tmp, ignore_errors=True)  # this script's own runs (and teacher, unless --teacher)


if __name__ == "__main__":
    main()
