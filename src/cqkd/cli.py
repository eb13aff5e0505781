"""The ``cqkd`` command: parse, validate, call the library. Nothing more.

User mistakes raise ``CqkdError`` in the library; here they become one line on stderr and
exit code 2 (argparse does the same for malformed options).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cqkd.errors import CqkdError, RunFailed, RunInterrupted

EXIT_USAGE = 2


EXIT_FAILED = 1


_DEFAULTS_NOTE = "(default: %s)"


def _default(name: str) -> Any:
    from dataclasses import fields

    from cqkd.core.config import RunConfig

    return {f.name: f.default for f in fields(RunConfig)}[name]


def _add_run_options(p: argparse.ArgumentParser, distill: bool) -> None:
    """Options shared by train and distill. Unset options keep the RunConfig default (or the
    value from --config), so the help shows the defaults but argparse stores nothing."""
    S = argparse.SUPPRESS
    d = _default
    g = p.add_argument_group("data and views")
    g.add_argument("--dataset", default=S, help=f"dataset name: fashion-mnist, cifar10, cifar100, imagefolder, synthetic {_DEFAULTS_NOTE % d('dataset')}")
    g.add_argument("--data-dir", default=S, help="a local copy of the dataset (else the system copy or a download)")
    g.add_argument("--crop-size", type=int, default=S, metavar="S", help=f"imagefolder: side of the random-resized (train) and center (eval) crop = the teacher's input {_DEFAULTS_NOTE % d('crop_size')}")
    g.add_argument("--val-size", type=int, default=S, metavar="N", help="images held out of train as the val split (default: the dataset's)")
    g.add_argument("--skip-bad-images", action="store_true", default=S, help="imagefolder: log, skip and count unreadable image files (default: fail naming the file)")
    g.add_argument("--train-samples", type=int, default=S, metavar="N", help="train on a fixed class-balanced subset of N images")
    g.add_argument("--size", type=int, default=S, metavar="S", help=f"input side length in px; images are resized to SxS {_DEFAULTS_NOTE % d('size')}")
    g.add_argument("--resize-mode", default=S, choices=["bilinear", "bicubic", "area", "nearest"], help=f"resize interpolation {_DEFAULTS_NOTE % d('resize_mode')}")
    g.add_argument("--degradation", default=S, metavar="SPEC", help="full degradation spec, e.g. 'size=7,mode=bicubic,blur=0.5,noise=0.02,upsample=true' (overrides --size)")
    g.add_argument("--augment", default=S, metavar="SPEC", help=f"training views: 'flip,translate=N' or 'none' {_DEFAULTS_NOTE % d('augment')}")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=S, help=f"model name (see `cqkd models`) {_DEFAULTS_NOTE % d('model')}")
    g.add_argument("--epochs", type=int, default=S, help=f"{_DEFAULTS_NOTE % d('epochs')}")
    g.add_argument("--batch-size", type=int, default=S, help=f"{_DEFAULTS_NOTE % d('batch_size')}")
    g.add_argument("--lr", type=float, default=S, help=f"peak learning rate {_DEFAULTS_NOTE % d('lr')}")
    g.add_argument("--weight-decay", type=float, default=S, help=f"{_DEFAULTS_NOTE % d('weight_decay')}")
    g.add_argument("--optimizer", default=S, choices=["adamw", "sgd"], help=f"{_DEFAULTS_NOTE % d('optimizer')}")
    g.add_argument("--schedule", default=S, choices=["onecycle", "cosine", "constant"], help=f"learning-rate schedule {_DEFAULTS_NOTE % d('schedule')}")
    g.add_argument("--seed", type=int, default=S, help=f"{_DEFAULTS_NOTE % d('seed')}")
    g.add_argument("--ece-bins", type=int, default=S, help=f"equal-width bins for ECE {_DEFAULTS_NOTE % d('ece_bins')}")
    if distill:
        g = p.add_argument_group("distillation")
        g.add_argument("--teacher", default=S, metavar="RUN_DIR|FILE", help="run directory of the trained teacher, or a weights file (.pt/.pth/.safetensors state dict) with --teacher-model (with --resume it comes from the stored config)")
        g.add_argument("--teacher-model", default=S, metavar="NAME", help="the teacher's architecture for a weights file or --teacher-weights (resnet50, timm:NAME, ...)")
        g.add_argument("--teacher-weights", default=S, metavar="NAME", help="pretrained teacher weights by name: a torchvision enum member (IMAGENET1K_V2, DEFAULT) or a timm tag (pretrained); downloaded where there is internet")
        g.add_argument("--temperature", default=S, metavar="T", help=f"distillation temperature T > 0, or 'calibrated' for the teacher's T_cal {_DEFAULTS_NOTE % d('temperature')}")
        g.add_argument("--alpha", type=float, default=S, help=f"weight of the soft (KL) term in [0, 1] {_DEFAULTS_NOTE % d('alpha')}")
        g.add_argument("--teacher-calibration", default=S, choices=["none", "temperature"], help="divide the teacher's logits by its T_cal (fitted on val) before T")
        g.add_argument("--teacher-cache", default=S, choices=["off", "auto"], help=f"auto: read the teacher's outputs from a cache next to the teacher run (built once) where that is exact; off: run the teacher every step {_DEFAULTS_NOTE % d('teacher_cache')}")
        g.add_argument("--views-per-image", default=S, metavar="K", help=f"distil on a fixed bank of K views per image (or 'all'); see docs/performance.md {_DEFAULTS_NOTE % d('views_per_image')}")
    g = p.add_argument_group("hardware (passed to Lightning)")
    g.add_argument("--accelerator", default=S, help=f"cpu, gpu, auto, ... {_DEFAULTS_NOTE % d('accelerator')}")
    g.add_argument("--devices", default=S, help=f"number of devices or 'auto' {_DEFAULTS_NOTE % d('devices')}")
    g.add_argument("--strategy", default=S, help=f"auto, ddp, ... {_DEFAULTS_NOTE % d('strategy')}")
    g.add_argument("--num-nodes", type=int, default=S, help=f"{_DEFAULTS_NOTE % d('num_nodes')}")
    g.add_argument("--precision", default=S, help=f"32, 16-mixed (CUDA), bf16-mixed {_DEFAULTS_NOTE % d('precision')}")
    g.add_argument("--num-workers", type=int, default=S, help=f"DataLoader workers {_DEFAULTS_NOTE % d('num_workers')}")
    g = p.add_argument_group("output")
    g.add_argument("--config", metavar="YAML", help="start from this configuration (a run's config.yaml works); options override it")
    g.add_argument("--out", required=True, metavar="DIR", help="the run directory to write")
    g.add_argument("--force", action="store_true", help="overwrite a finished (or unfinished) run in --out")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint; its stored config.yaml "
                        "is the starting point and given options must not change it")
    g.add_argument("--checkpoint-every-n-steps", type=int, default=S, metavar="N",
                   help=f"write a resumable checkpoint every N optimizer steps, 0 = epoch ends only {_DEFAULTS_NOTE % d('checkpoint_every_n_steps')}")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


_NOT_CONFIG = {"command", "func", "config", "out", "force", "quiet", "resume"}


def _config_from_args(args: argparse.Namespace, kind: str):
    from cqkd.core.config import RunConfig

    raw: dict[str, Any] = {}
    if getattr(args, "resume", False) and not args.config:
        from cqkd.core.rundir import RunDir

        run = RunDir(args.out)
        if not run.config_file.exists():
            raise CqkdError(f"--resume: {args.out!r} holds no run to resume (no config.yaml); drop --resume to start one")
        raw.update(run.config().to_dict())
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise CqkdError(f"cannot read --config {args.config!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise CqkdError(f"--config {args.config!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise CqkdError(f"--config {args.config!r} must hold a mapping of options")
        _check_config_keys(loaded, f"--config {args.config!r}")
        raw.update(loaded)
    raw.update({k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    raw["kind"] = kind
    if isinstance(raw.get("devices"), str) and raw["devices"].isdigit():
        raw["devices"] = int(raw["devices"])
    return RunConfig.from_dict(raw, where="options")


def _check_config_keys(loaded: dict[str, Any], where: str) -> None:
    """Unknown keys and wrong types in a YAML file, reported against that file."""
    import difflib
    import typing
    from dataclasses import fields

    from cqkd.core.config import RunConfig, _coerce

    known = {f.name for f in fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    for key, value in loaded.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CqkdError(f"{where}: unknown key {key!r} (value {value!r}){hint}")
        _coerce(key, value, hints[key], where)


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from cqkd.study.tables import metrics_table

    metrics_table(title, metrics)


def cmd_train(args: argparse.Namespace, kind: str = "train") -> int:
    from cqkd.train.fit import fit_run

    cfg = _config_from_args(args, kind)
    metrics = fit_run(cfg, args.out, force=args.force, progress=not args.quiet, resume=args.resume)
    from cqkd.train.setup import is_rank_zero

    if is_rank_zero():
        _print_metrics(f"{kind} run {args.out}", metrics)
        print(f"run directory: {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    return cmd_train(args, kind="distill")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cqkd.train.fit import evaluate_run

    if args.bootstrap < 0:
        raise CqkdError(f"--bootstrap must be >= 0 (0 = no intervals), got {args.bootstrap}")
    if args.ece_bins is not None and args.ece_bins < 1:
        raise CqkdError(f"--ece-bins must be at least 1, got {args.ece_bins}")
    overrides = {} if args.ece_bins is None else {"ece_bins": args.ece_bins}
    outputs: dict[str, Any] = {}
    metrics = evaluate_run(args.run, progress=not args.quiet, outputs=outputs, **overrides)
    _print_metrics(f"evaluation of {args.run} (test split)", metrics)
    if args.bootstrap:
        from cqkd.calibration.metrics import bootstrap_intervals
        from cqkd.study.tables import intervals_table

        intervals = bootstrap_intervals(outputs["logits"], outputs["labels"], n=args.bootstrap,
                                        seed=args.bootstrap_seed, ece_bins=metrics["ece_bins"])
        intervals_table(f"95% percentile bootstrap intervals ({args.bootstrap} resamples of the "
                        f"{metrics['n']} test samples, seed {args.bootstrap_seed})", intervals)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cqkd.study.tables import calibration_table
    from cqkd.train.calibrate import calibrate_run

    result = calibrate_run(args.run, split=args.split, ece_bins=args.ece_bins, progress=not args.quiet)
    calibration_table(args.run, result)
    print(f"written: {os.path.join(args.run, 'calibration.json')}")
    return 0


def cmd_plot_reliability(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cqkd.calibration.plots import reliability_diagram
    from cqkd.core.rundir import RunDir

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise CqkdError(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    if Path(args.out).suffix.lower() != ".png":
        raise CqkdError(f"--out {args.out!r} must be a .png file")
    if args.ece_bins < 1:
        raise CqkdError(f"--ece-bins must be at least 1, got {args.ece_bins}")
    names = args.labels or [Path(r).name or r for r in args.runs]
    if args.labels is None and len(set(names)) < len(names):
        names = list(args.runs)
    entries = []
    for name, path in zip(names, args.runs):
        run = RunDir(path)
        if not run.path.is_dir():
            raise CqkdError(f"run {path!r} is not a directory")
        saved = run.test_logits()
        if "logits" not in saved or "labels" not in saved:
            raise CqkdError(f"{run.logits_file} holds no test logits and labels")
        entries.append((name, saved["logits"], saved["labels"]))
    out = reliability_diagram(entries, args.out, n_bins=args.ece_bins)
    print(f"written: {out}")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    from cqkd.study.tables import runs_table

    runs_table(args.dir)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cqkd.study.tables import models_table

    models_table(args.size, args.channels, args.classes)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cqkd.study.demo import run_demo

    rows = run_demo(args.out, data_dir=args.data_dir, epochs=args.epochs, train_samples=args.train_samples,
                    force=args.force, progress=not args.quiet)
    return 1 if any(r["top-1"] == "failed" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    from cqkd import __version__

    parser = argparse.ArgumentParser(
        prog="cqkd",
        description="Cross-quality knowledge distillation: train a full-resolution teacher, then "
                    "distil it into a student that only sees low-resolution views of the same images.",
        epilog="Run `cqkd COMMAND --help` for a command's options. Each run writes a directory with "
               "config.yaml, metrics.json, checkpoints/, test_logits.pt and metrics.csv.",
    )
    parser.add_argument("--version", action="version", version=f"cqkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, description: str | None = None):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter if name in ("models", "demo") else argparse.HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "train a model supervised at one input size (a teacher, or a low-resolution baseline)")
    _add_run_options(p, distill=False)
    p = add("distill", cmd_distill, "train a low-resolution student by cross-quality distillation from a teacher run",
            "Train a student on degraded views; the frozen teacher sees the full-resolution view of the same "
            "crop. Loss = (1-α)·CE + α·T²·KL(softmax(z_t/(T_cal·T)) ‖ softmax(z_s/T)).")
    _add_run_options(p, distill=True)
    p = add("evaluate", cmd_evaluate, "recompute and print a run's test metrics from its saved weights")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="also print 95%% percentile bootstrap intervals for top1, nll and ece from N resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED", help="seed of the bootstrap resampling (default: 0)")
    p.add_argument("--ece-bins", type=int, default=None, help="equal-width bins for ECE (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("calibrate", cmd_calibrate, "fit the run's temperature T_cal on val and print NLL and ECE before and after",
            "Temperature scaling (Guo et al., 2017): fit one T_cal > 0 minimising the NLL of softmax(z / T_cal) on "
            "the run's validation split, report NLL and ECE before and after on val and test, and write "
            "RUN_DIR/calibration.json (which --teacher-calibration temperature and --temperature calibrated read).")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--split", default="val", help="the split to fit on; never test (default: val)")
    p.add_argument("--ece-bins", type=int, default=15, help="equal-width bins for ECE (default: 15)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p = add("plot", lambda a: a.plot_func(a), "draw figures from finished runs")
    plots = p.add_subparsers(dest="plot", required=True, metavar="FIGURE")
    q = plots.add_parser("reliability", help="reliability diagram of one or more runs' test predictions",
                         description="Accuracy against confidence in equal-width bins, the gap to the diagonal "
                                     "shaded, samples per bin below, ECE in the legend; from each run's test_logits.pt.")
    q.set_defaults(plot_func=cmd_plot_reliability)
    q.add_argument("runs", nargs="+", metavar="RUN_DIR")
    q.add_argument("--out", required=True, metavar="FILE.png", help="the PNG file to write")
    q.add_argument("--labels", nargs="+", default=None, metavar="NAME", help="legend names, one per run (default: the directory names)")
    q.add_argument("--ece-bins", type=int, default=15, help="equal-width bins (default: 15)")
    p = add("models", cmd_models, "list the registered models with parameters and FLOPs")
    p.add_argument("--size", type=int, default=28, help="input size for the FLOPs column")
    p.add_argument("--channels", type=int, default=1, help="input channels")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    p = add("demo", cmd_demo, "run the default Fashion-MNIST study: teacher, supervised and CQKD students at 14 and 7 px")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs")
    p.add_argument("--data-dir", default=None, help="a local copy of Fashion-MNIST")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epochs per run")
    p.add_argument("--train-samples", type=int, default=None, help="override the demo's training subset")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("runs", help="inspect run directories", description="inspect run directories")
    runs_sub = p.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    q = runs_sub.add_parser("list", help="a table of the runs under DIR: state, kind, model, size, top-1, ECE")
    q.add_argument("dir", metavar="DIR")
    q.set_defaults(func=cmd_runs_list)
    for extra in _EXTENSIONS:
        extra(sub, add)
    return parser


# Later modules register subcommands here: callables (subparsers, add) -> None.
_EXTENSIONS: list[Callable[[Any, Callable[..., argparse.ArgumentParser]], None]] = []


# ---------------------------------------------------------------------- sweep and report
def cmd_sweep(args: argparse.Namespace) -> int:
    from cqkd.errors import RunInterrupted
    from cqkd.study.launch import launch
    from cqkd.study.plan import load_sweep

    if args.status:
        from cqkd.study.tables import sweep_status_table

        sweep_status_table(args.status, args.stale_after)
        return 0
    if not args.config or not args.out:
        raise CqkdError("give the sweep file and --out DIR (or --status DIR)")
    plan = load_sweep(args.config, args.out)
    try:
        return launch(plan, workers=args.workers, launcher=args.launcher, threads=args.threads_per_worker,
                      devices_per_worker=args.devices_per_worker, address=args.address, force=args.force,
                      stale_after=args.stale_after, progress=not args.quiet, dry_run=args.dry_run)
    except RunInterrupted as e:
        print(f"cqkd: {e}; run the same `cqkd sweep` command again to continue", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130


def cmd_report(args: argparse.Namespace) -> int:
    from cqkd.study.report import write_report

    paths = write_report(args.dir)
    print(f"report: {paths['report']}  table: {paths['csv']}  figures: {len(paths['figures'])}")
    return 0


def _add_sweep_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("sweep", cmd_sweep, "run a resumable grid of teacher, supervised and CQKD runs from a YAML file",
            "Run every grid point of CONFIG.yaml (base, teachers, supervised, distill) as a run directory "
            "under --out, teachers first. Finished runs with the same resolved config are skipped, interrupted "
            "ones continue from their checkpoint; failed runs are recorded in DIR/sweep.json and the sweep "
            "goes on (exit 1 at the end if any failed). Any number of workers may work on one DIR. "
            "Then: cqkd report DIR.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="the sweep file (see configs/fashion-mnist-study.yaml)")
    p.add_argument("--out", metavar="DIR", help="directory for the sweep's runs and sweep.json")
    p.add_argument("--dry-run", action="store_true", help="list what would run and what is done; run nothing")
    p.add_argument("--force", action="store_true", help="rerun finished runs too")
    p.add_argument("--quiet", action="store_true", help="no progress bar (a line per finished run)")
    p.add_argument("--status", metavar="DIR", help="show who runs what in the sweep directory DIR, and exit")
    g = p.add_argument_group("workers (see docs/sweeps.md)")
    g.add_argument("--workers", type=int, metavar="N", help="start N worker processes here (or N Ray tasks); "
                   "default: this process is one worker, next to any others on --out")
    g.add_argument("--threads-per-worker", type=int, metavar="T", help="CPU threads of each worker (default: the cores / N)")
    g.add_argument("--devices-per-worker", type=int, default=0, metavar="K", help="GPUs of each worker (default: 0)")
    g.add_argument("--launcher", choices=["local", "ray"], default="local", help="local processes or Ray tasks (default: local)")
    g.add_argument("--address", metavar="ADDR", help="ray: the cluster to use ('auto': the running one; default: start a local instance)")
    g.add_argument("--stale-after", type=float, metavar="S", help="take over a run whose worker's heartbeat is older than S seconds (default: 60)")
    p = add("report", cmd_report, "write DIR/results.csv, DIR/report.md and figures for a sweep directory")
    p.add_argument("dir", metavar="DIR", help="a sweep output directory (with sweep.json) or any folder of runs")


_EXTENSIONS.append(_add_sweep_commands)


def _quiet_libraries() -> None:
    """Keep Lightning's banners and known-harmless warnings out of the user's terminal."""
    import warnings

    os.environ["CQKD_QUIET_LIGHTNING"] = "1"
    for pattern in (".*LeafSpec.*", ".*does not have many workers.*", ".*Experiment logs directory.*",
                    ".*exists and is not empty.*", ".*litlogger.*",
                    r".*module\(s\) in eval mode.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CqkdError as e:
        print(f"cqkd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunInterrupted as e:
        out = getattr(args, "out", None)
        hint = f"; continue with: cqkd {args.command} --out {out} --resume" if out and e.checkpoint else ""
        print(f"cqkd: {e}{hint}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except RunFailed as e:
        print(f"cqkd: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cqkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
