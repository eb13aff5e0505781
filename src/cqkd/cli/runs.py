"""The commands that make and read single runs: train, distill, evaluate, calibrate, plot, models, demo, runs."""

from __future__ import annotations

import argparse
import os
import time
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from cqkd.errors import CqkdError


def _add_run_options(p: argparse.ArgumentParser, distill: bool) -> None:
    """The options of train and distill, one per ``RunConfig`` field (its type, default and help).

    Unset options keep the RunConfig default (or the value from --config): argparse stores nothing
    for them, and the help shows the defaults."""
    from cqkd.core.config import GROUPS, RunConfig

    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = typing.get_type_hints(RunConfig)
    for f in fields(RunConfig):
        meta = f.metadata
        if not meta.get("cli", False) or (meta["distill"] and not distill):
            continue
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
        help_text = meta["help"]
        if f.default is not MISSING and f.default is not None and f.default is not False:
            help_text += f" (default: {f.default})"
        if hints[f.name] is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(metavar=meta["metavar"], choices=meta["choices"])
            if hints[f.name] in (int, float):
                kwargs["type"] = hints[f.name]
            if f.name == "logger":  # --logger tensorboard --logger mlflow == --logger tensorboard,mlflow
                kwargs["action"] = "append"
        groups[meta["group"]].add_argument("--" + f.name.replace("_", "-"), help=help_text, **kwargs)
    g = groups["output"]
    g.add_argument("--config", metavar="YAML", help="start from this configuration (a run's config.yaml works); options override it")
    g.add_argument("--out", required=True, metavar="DIR", help="the run directory to write")
    g.add_argument("--force", action="store_true", help="overwrite a finished (or unfinished) run in --out")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last checkpoint; its stored config.yaml "
                        "is the starting point and given options must not change it")
    g.add_argument("--quiet", action="store_true", help="no progress display")


_NOT_CONFIG = {"command", "func", "config", "out", "force", "quiet", "resume"}


def _config_from_args(args: argparse.Namespace, kind: str):
    from cqkd.core.config import RunConfig

    raw: dict[str, Any] = {}
    stored_teacher = None
    if getattr(args, "resume", False) and not args.config:
        from cqkd.core.rundir import RunDir

        run = RunDir(args.out)
        if not run.is_run or not run.config_file.exists():
            raise CqkdError(f"--resume: {args.out!r} holds no run to resume (no cqkd run there); drop --resume "
                            "to start one")
        raw.update(run.config().to_dict())
        stored_teacher = raw.get("teacher")
    if args.config:
        from cqkd.core.io import read_yaml

        where = f"--config {args.config!r}"
        loaded = read_yaml(args.config, name=where, what="a mapping of options")
        _check_config_keys(loaded, where)
        raw.update(loaded)
    raw.update({k: ",".join(v) if k == "logger" else v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    raw["kind"] = kind
    teacher = raw.get("teacher")
    if kind == "distill" and isinstance(teacher, str) and teacher and "\x00" not in teacher:
        # recorded absolute, so that it means the same from any directory (a resumed run keeps its own spelling)
        if not (isinstance(stored_teacher, str) and os.path.abspath(stored_teacher) == os.path.abspath(teacher)):
            raw["teacher"] = os.path.abspath(teacher)
    if isinstance(raw.get("devices"), str) and raw["devices"].isdigit():
        raw["devices"] = int(raw["devices"])
    return RunConfig.from_dict(raw, where="options")


def _check_config_keys(loaded: dict[str, Any], where: str) -> None:
    """Unknown keys and wrong types in a YAML file, reported against that file."""

    from cqkd.core.config import CONFIG_KEYS, RunConfig, _coerce
    from cqkd.errors import check_keys

    check_keys(loaded, CONFIG_KEYS, where, show_value=True)
    hints = typing.get_type_hints(RunConfig)
    for key, value in loaded.items():
        _coerce(key, value, hints[key], where)


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from cqkd.cli.tables import metrics_table

    metrics_table(title, metrics)


def cmd_train(args: argparse.Namespace, kind: str = "train") -> int:
    """``cqkd train``: fit a run from the command line's config and print its test metrics."""
    from cqkd.train.fit import fit_run

    cfg = _config_from_args(args, kind)
    metrics = fit_run(cfg, args.out, force=args.force, progress=not args.quiet, resume=args.resume, quiet=True)
    from cqkd.train.setup import is_rank_zero

    if is_rank_zero():
        _print_metrics(f"{kind} run {args.out}", metrics)
        print(f"run directory: {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """``cqkd distill``: ``cqkd train`` with a teacher (kind ``distill``)."""
    return cmd_train(args, kind="distill")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cqkd evaluate``: re-evaluate runs on the test split, with optional bootstrap intervals or under shift."""
    from cqkd.train.fit import evaluate_run

    _check_range("--bootstrap", args.bootstrap, 0, 1_000_000, "0 = no intervals")
    _check_range("--bootstrap-seed", args.bootstrap_seed, 0, 2**32 - 1)
    if args.ece_bins is not None:
        _check_range("--ece-bins", args.ece_bins, 1, 100_000)
    if args.shift is not None or args.baseline is not None:
        return _evaluate_shift(args)
    overrides = {} if args.ece_bins is None else {"ece_bins": args.ece_bins}
    for run in args.run:
        outputs: dict[str, Any] = {}
        metrics = evaluate_run(run, progress=not args.quiet, outputs=outputs, quiet=True, **overrides)
        _print_metrics(f"evaluation of {run} (test split)", metrics)
        if args.bootstrap:
            from cqkd.calibration.bootstrap import bootstrap_intervals
            from cqkd.cli.tables import intervals_table

            intervals = bootstrap_intervals(outputs["logits"], outputs["labels"], n=args.bootstrap,
                                            seed=args.bootstrap_seed, ece_bins=metrics["ece_bins"])
            intervals_table(f"95% percentile bootstrap intervals ({args.bootstrap} resamples of the "
                            f"{metrics['n']} test samples, seed {args.bootstrap_seed})", intervals)
    return 0


def _evaluate_shift(args: argparse.Namespace) -> int:
    """``cqkd evaluate RUN... --shift [FILE] [--baseline RUN]``: write each RUN/shift.csv, print the tables."""
    from cqkd.analysis.shift import corruption_errors, read_shift
    from cqkd.cli.tables import shift_table
    from cqkd.core.io import read_yaml
    from cqkd.core.rundir import RunDir
    from cqkd.train.shift import write_shift
    from cqkd.views.corrupt import parse_grid

    if args.shift is None:
        raise CqkdError("--baseline needs --shift (the mCE is computed from the shift evaluation)")
    if args.bootstrap or args.ece_bins is not None:
        raise CqkdError("--shift does not take --bootstrap or --ece-bins (the run's own ECE bins are used)")
    grid = None
    if args.shift != _DEFAULT_GRID:
        where = f"--shift {args.shift!r}"
        grid = parse_grid(read_yaml(args.shift, name=where, what="a mapping of corruptions to severities"), where)
    for run in [*args.run, *([args.baseline] if args.baseline else [])]:
        if not RunDir(run).is_finished:
            raise CqkdError(f"run {run!r} is not a finished cqkd run")
    written = {}
    for run in dict.fromkeys([*args.run, *([args.baseline] if args.baseline else [])]):
        out, rows = write_shift(run, grid)
        written[run] = rows
        print(f"written: {out}")
    base = read_shift(args.baseline) if args.baseline else None
    for run in args.run:
        errors = corruption_errors(written[run], base) if base is not None else None
        shift_table(run, written[run], errors, args.baseline)
    return 0


_DEFAULT_GRID = "<the default grid>"  # argparse const of a bare --shift (not a file name)


def _check_range(option: str, value: int, low: int, high: int, note: str = "") -> None:
    """A numeric option within [low, high] (one line naming it otherwise)."""
    if not low <= value <= high:
        raise CqkdError(f"{option} must be in [{low}, {high}]{f' ({note})' if note else ''}, got {value}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cqkd calibrate``: fit the run's temperature on a split and write ``calibration.json``."""
    from cqkd.cli.tables import calibration_table
    from cqkd.train.calibrate import calibrate_run

    result = calibrate_run(args.run, split=args.split, ece_bins=args.ece_bins, progress=not args.quiet,
                           quiet=True)
    calibration_table(args.run, result)
    print(f"written: {os.path.join(args.run, 'calibration.json')}")
    return 0


def _figure_names(args: argparse.Namespace) -> list[str]:
    """Check a plot command's --out (a new .png file) and --labels; the legend name of each run."""
    from cqkd.core.io import check_output_file

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise CqkdError(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    if Path(args.out).suffix.lower() != ".png":
        raise CqkdError(f"--out {args.out!r} must be a .png file")
    check_output_file(args.out, "--out")
    names = args.labels or [Path(r).name or r for r in args.runs]
    if args.labels is None and len(set(names)) < len(names):
        names = list(args.runs)
    return names


def cmd_plot_reliability(args: argparse.Namespace) -> int:
    """``cqkd plot reliability``: draw one reliability diagram (.png) from the test logits of one or more runs."""
    from cqkd.calibration.plots import reliability_diagram
    from cqkd.core.rundir import RunDir

    names = _figure_names(args)
    _check_range("--ece-bins", args.ece_bins, 1, 100_000)
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


def cmd_plot_shift(args: argparse.Namespace) -> int:
    """``cqkd plot shift``: top-1 and ECE against severity from the runs' shift.csv files, overlaid (.png)."""
    from cqkd.analysis.shift import read_shift, shift_figure

    names = _figure_names(args)
    out = shift_figure([(n, read_shift(r)) for n, r in zip(names, args.runs)], args.out)
    print(f"written: {out}")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    """``cqkd runs list``: print a table of the runs under a directory."""
    from cqkd.cli.tables import runs_table

    runs_table(args.dir)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``cqkd models``: print the registered models with their parameters and FLOPs at the given input shape."""
    from cqkd.cli.tables import models_table

    _check_range("--size", args.size, 1, 1024)
    _check_range("--channels", args.channels, 1, 64)
    _check_range("--classes", args.classes, 1, 100_000)
    models_table(args.size, args.channels, args.classes)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """``cqkd methods``: the distillation methods, their options, needs and papers."""
    from cqkd.cli.tables import methods_table

    methods_table()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``cqkd demo``: run the small demo study; exit 1 if any of its runs failed."""
    from cqkd.cli.tables import print_rows
    from cqkd.sweep.demo import READING, run_demo

    if args.epochs is not None:
        _check_range("--epochs", args.epochs, 1, 2**31 - 1)
    if args.train_samples is not None:
        _check_range("--train-samples", args.train_samples, 1, 2**31 - 1)
    start = time.time()
    headers, rows = run_demo(args.out, data_dir=args.data_dir, epochs=args.epochs, train_samples=args.train_samples,
                             force=args.force, progress=not args.quiet)
    print_rows("cqkd demo: test split", headers, rows)
    print(READING)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; results: {args.out}/summary.md (runs under {args.out}/)")
    return 1 if any(r[headers.index("top-1")] == "failed" for r in rows) else 0


def _add_figure_args(q: argparse.ArgumentParser) -> None:
    """The arguments every figure takes: its runs, --out FILE.png and --labels (see ``_figure_names``)."""
    q.add_argument("runs", nargs="+", metavar="RUN_DIR")
    q.add_argument("--out", required=True, metavar="FILE.png", help="the PNG file to write")
    q.add_argument("--labels", nargs="+", default=None, metavar="NAME", help="legend names, one per run (default: the directory names)")


def add_run_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register train, distill, evaluate, calibrate, plot, models, demo and runs on ``sub``."""
    p = add("train", cmd_train, "train a model supervised at one input size (a teacher, or a low-resolution baseline)")
    _add_run_options(p, distill=False)
    p = add("distill", cmd_distill, "train a low-resolution student by cross-quality distillation from a teacher run",
            "Train a student on degraded views; the frozen teacher sees the full-resolution view of the same "
            "crop. Loss = (1-α)·CE + α·T²·KL(softmax(z_t/(T_cal·T)) ‖ softmax(z_s/T)).")
    _add_run_options(p, distill=True)
    p = add("evaluate", cmd_evaluate, "recompute and print a run's test metrics from its saved weights")
    p.add_argument("run", nargs="+", metavar="RUN_DIR")
    p.add_argument("--shift", nargs="?", const=_DEFAULT_GRID, default=None, metavar="FILE",
                   help="evaluate under shift and write RUN_DIR/shift.csv: each test image corrupted at full resolution "
                        "(default grid: jpeg, gaussian_noise, gaussian_blur, pixelate, contrast at severities 1-5; "
                        "FILE: a YAML mapping of corruptions to lists of severities), then the run's degradation")
    p.add_argument("--baseline", default=None, metavar="RUN_DIR",
                   help="with --shift: also the corruption errors and mCE relative to this run (ImageNet-C)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="also print 95%% percentile bootstrap intervals for top1, nll and ece from N resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED", help="seed of the bootstrap resampling (default: 0)")
    p.add_argument("--ece-bins", type=int, default=None, help="equal-width bins for ECE (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("calibrate", cmd_calibrate, "fit the run's temperature T_cal on val and print NLL and ECE before and after",
            "Temperature scaling (Guo et al., 2017): fit one T_cal > 0 minimising the NLL of softmax(z / T_cal) on "
            "the run's validation split, report NLL and ECE before and after on val and test, and write "
            "RUN_DIR/calibration.json (which --teacher-calibration temperature and --temperature calibrated read).")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--split", default="val", choices=("val", "train", "test"),
                   help="the split to fit on; never test; only a T_cal fitted on val is used for distillation "
                        "(default: val)")
    p.add_argument("--ece-bins", type=int, default=15, help="equal-width bins for ECE (default: 15)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p = add("plot", lambda a: a.plot_func(a), "draw figures from finished runs")
    plots = p.add_subparsers(dest="plot", required=True, metavar="FIGURE")
    q = plots.add_parser("reliability", help="reliability diagram of one or more runs' test predictions",
                         description="Accuracy against confidence in equal-width bins, the gap to the diagonal "
                                     "shaded, samples per bin below, ECE in the legend; from each run's test_logits.pt.")
    q.set_defaults(plot_func=cmd_plot_reliability)
    _add_figure_args(q)
    q.add_argument("--ece-bins", type=int, default=15, help="equal-width bins (default: 15)")
    q = plots.add_parser("shift", help="top-1 and ECE against corruption severity of one or more runs",
                         description="One column per corruption (severity 0 = clean), top-1 above and ECE below, "
                                     "the runs overlaid; from each run's shift.csv (`cqkd evaluate RUN --shift`).")
    q.set_defaults(plot_func=cmd_plot_shift)
    _add_figure_args(q)
    p = add("models", cmd_models, "list the registered models with parameters and FLOPs")
    p.add_argument("--size", type=int, default=28, help="input size for the FLOPs column")
    p.add_argument("--channels", type=int, default=1, help="input channels")
    p.add_argument("--classes", type=int, default=10, help="number of classes")
    add("methods", cmd_methods, "list the distillation methods (--method) with options, defaults, needs and papers")
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
