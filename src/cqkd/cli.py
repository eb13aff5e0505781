"""The ``cqkd`` command: parse, validate, call the library. Nothing more.

User mistakes raise ``CqkdError`` in the library; here they become one line on stderr and
exit code 2 (argparse does the same for malformed options).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from cqkd.errors import CqkdError, RunFailed, RunInterrupted

EXIT_USAGE = 2


EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user mistake (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"cqkd: error: {self.prog}: {one_line(message)} (see `{self.prog} --help`)\n")


def one_line(text: str) -> str:
    """``text`` on one line (a message is never allowed to spill over several)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _add_run_options(p: argparse.ArgumentParser, distill: bool) -> None:
    """The options of train and distill, one per ``RunConfig`` field (its type, default and help).

    Unset options keep the RunConfig default (or the value from --config): argparse stores nothing
    for them, and the help shows the defaults."""
    import typing
    from dataclasses import MISSING, fields

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
    if getattr(args, "resume", False) and not args.config:
        from cqkd.core.rundir import RunDir

        run = RunDir(args.out)
        if not run.is_run or not run.config_file.exists():
            raise CqkdError(f"--resume: {args.out!r} holds no run to resume (no cqkd run there); drop --resume "
                            "to start one")
        raw.update(run.config().to_dict())
    if args.config:
        from cqkd.core.io import read_yaml

        where = f"--config {args.config!r}"
        loaded = read_yaml(args.config, name=where, what="a mapping of options")
        _check_config_keys(loaded, where)
        raw.update(loaded)
    raw.update({k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    raw["kind"] = kind
    if isinstance(raw.get("devices"), str) and raw["devices"].isdigit():
        raw["devices"] = int(raw["devices"])
    return RunConfig.from_dict(raw, where="options")


def _check_config_keys(loaded: dict[str, Any], where: str) -> None:
    """Unknown keys and wrong types in a YAML file, reported against that file."""
    import typing

    from cqkd.core.config import CONFIG_KEYS, RunConfig, _coerce
    from cqkd.errors import check_keys

    check_keys(loaded, CONFIG_KEYS, where, show_value=True)
    hints = typing.get_type_hints(RunConfig)
    for key, value in loaded.items():
        _coerce(key, value, hints[key], where)


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from cqkd.study.tables import metrics_table

    metrics_table(title, metrics)


def cmd_train(args: argparse.Namespace, kind: str = "train") -> int:
    """``cqkd train``: fit a run from the command line's config and print its test metrics."""
    from cqkd.train.fit import fit_run

    cfg = _config_from_args(args, kind)
    metrics = fit_run(cfg, args.out, force=args.force, progress=not args.quiet, resume=args.resume)
    from cqkd.train.setup import is_rank_zero

    if is_rank_zero():
        _print_metrics(f"{kind} run {args.out}", metrics)
        print(f"run directory: {args.out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """``cqkd distill``: ``cqkd train`` with a teacher (kind ``distill``)."""
    return cmd_train(args, kind="distill")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``cqkd evaluate``: re-evaluate a run on the test split, with optional bootstrap intervals."""
    from cqkd.train.fit import evaluate_run

    _check_range("--bootstrap", args.bootstrap, 0, 1_000_000, "0 = no intervals")
    _check_range("--bootstrap-seed", args.bootstrap_seed, 0, 2**32 - 1)
    if args.ece_bins is not None:
        _check_range("--ece-bins", args.ece_bins, 1, 100_000)
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


def _check_range(option: str, value: int, low: int, high: int, note: str = "") -> None:
    """A numeric option within [low, high] (one line naming it otherwise)."""
    if not low <= value <= high:
        raise CqkdError(f"{option} must be in [{low}, {high}]{f' ({note})' if note else ''}, got {value}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cqkd calibrate``: fit the run's temperature on a split and write ``calibration.json``."""
    from cqkd.study.tables import calibration_table
    from cqkd.train.calibrate import calibrate_run

    result = calibrate_run(args.run, split=args.split, ece_bins=args.ece_bins, progress=not args.quiet)
    calibration_table(args.run, result)
    print(f"written: {os.path.join(args.run, 'calibration.json')}")
    return 0


def cmd_plot_reliability(args: argparse.Namespace) -> int:
    """``cqkd plot-reliability``: draw one reliability diagram (.png) from the test logits of one or more runs."""
    from pathlib import Path

    from cqkd.calibration.plots import reliability_diagram
    from cqkd.core.io import check_output_file
    from cqkd.core.rundir import RunDir

    if args.labels is not None and len(args.labels) != len(args.runs):
        raise CqkdError(f"--labels has {len(args.labels)} names for {len(args.runs)} runs")
    if Path(args.out).suffix.lower() != ".png":
        raise CqkdError(f"--out {args.out!r} must be a .png file")
    check_output_file(args.out, "--out")
    _check_range("--ece-bins", args.ece_bins, 1, 100_000)
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
    """``cqkd runs list``: print a table of the runs under a directory."""
    from cqkd.study.tables import runs_table

    runs_table(args.dir)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``cqkd models``: print the registered models with their parameters and FLOPs at the given input shape."""
    from cqkd.study.tables import models_table

    _check_range("--size", args.size, 1, 1024)
    _check_range("--channels", args.channels, 1, 64)
    _check_range("--classes", args.classes, 1, 100_000)
    models_table(args.size, args.channels, args.classes)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``cqkd demo``: run the small demo study; exit 1 if any of its runs failed."""
    from cqkd.study.demo import run_demo

    if args.epochs is not None:
        _check_range("--epochs", args.epochs, 1, 2**31 - 1)
    if args.train_samples is not None:
        _check_range("--train-samples", args.train_samples, 1, 2**31 - 1)
    rows = run_demo(args.out, data_dir=args.data_dir, epochs=args.epochs, train_samples=args.train_samples,
                    force=args.force, progress=not args.quiet)
    return 1 if any(r["top-1"] == "failed" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cqkd`` argument parser with every subcommand."""
    from cqkd import __version__

    parser = _Parser(
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
    """``cqkd sweep``: launch (or resume) a sweep's runs, or with ``--status`` print its progress."""
    from cqkd.core.rundir import check_sweep_dir
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
    check_sweep_dir(plan.out)
    try:
        return launch(plan, workers=args.workers, launcher=args.launcher, threads=args.threads_per_worker,
                      devices_per_worker=args.devices_per_worker, address=args.address, force=args.force,
                      stale_after=args.stale_after, progress=not args.quiet, dry_run=args.dry_run)
    except RunInterrupted as e:
        print(f"cqkd: {e}; run the same `cqkd sweep` command again to continue", file=sys.stderr)
        return e.exit_code


def cmd_report(args: argparse.Namespace) -> int:
    """``cqkd report``: write a sweep's markdown report, CSV table and figures."""
    from cqkd.study.report import write_report

    paths = write_report(args.dir)
    print(f"report: {paths['report']}  table: {paths['csv']}  figures: {len(paths['figures'])}")
    return 0


def cmd_report_conditions(args: argparse.Namespace) -> int:
    """``cqkd report-conditions``: write the report comparing runs across conditions."""
    from cqkd.study.conditions import write_conditions_report

    print(f"report: {write_conditions_report(args.dir, args.main, args.out)}")
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
    p = add("report-conditions", cmd_report_conditions,
            "the findings under each condition: a conditions sweep (configs/fashion-mnist-conditions.yaml) with "
            "the main study it extends")
    p.add_argument("dir", nargs="+", metavar="DIR", help="the conditions sweep's directory (or several)")
    p.add_argument("--main", required=True, metavar="DIR", help="the main study's sweep directory")
    p.add_argument("--out", default=None, metavar="FILE.md", help="where to write the report (default: the first DIR/conditions.md)")


_EXTENSIONS.append(_add_sweep_commands)


# ---------------------------------------------------------------------- predict and export
EXIT_SKIPPED = 3  # cqkd predict --skip-bad-images: some files were unreadable, the rest predicted


def cmd_predict(args: argparse.Namespace) -> int:
    """``cqkd predict``: classify image files with a trained run and print or write the predictions."""
    from cqkd.deploy.files import FORMATS, format_predictions, predict_files, write_predictions
    from cqkd.deploy.predictor import load_predictor
    from cqkd.errors import unknown_name

    if args.format not in FORMATS:
        raise unknown_name("output format", args.format, FORMATS)
    if args.top_k < 1:
        raise CqkdError(f"--top-k must be at least 1, got {args.top_k}")
    if args.out and os.path.exists(args.out) and not args.force:
        raise CqkdError(f"--out {args.out!r} exists; pass --force to overwrite it")
    predictor = load_predictor(args.run, calibration=not args.no_calibration)
    result = predict_files(predictor, args.inputs, batch_size=args.batch_size, calibrated=not args.no_calibration,
                           skip_bad_images=args.skip_bad_images, progress=not args.quiet)
    text = format_predictions(result, args.top_k, args.format)
    if args.out:
        write_predictions(text, args.out, force=args.force)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    meta = predictor.meta
    if predictor.t_cal is not None:
        temperature = f"calibrated with T_cal = {predictor.t_cal:.4g} from calibration.json"
    elif args.no_calibration:
        temperature = "uncalibrated (T = 1, --no-calibration)"
    else:
        temperature = f"uncalibrated (T = 1: no calibration.json; `cqkd calibrate {args.run}` fits one)"
    line = (f"cqkd: predicted {len(result.paths)} image(s) with {meta['kind']} run {args.run} ({meta['model']} at "
            f"{predictor.input_size} px); probabilities {temperature}")
    if result.skipped:
        names = ", ".join(p for p, _ in result.skipped[:5]) + (", ..." if len(result.skipped) > 5 else "")
        line += f"; skipped {len(result.skipped)} unreadable file(s): {names}"
    if args.out:
        line += f"; written: {args.out}"
    print(line, file=sys.stderr)
    return EXIT_SKIPPED if result.skipped else 0


def cmd_export(args: argparse.Namespace) -> int:
    """``cqkd export``: export a run's model to a deployable format and check its parity on test images."""
    from cqkd.deploy.export import export_run

    done = export_run(args.run, args.format, args.out, with_preprocessing=args.with_preprocessing,
                      force=args.force, parity_samples=args.parity_samples)
    p = done.card["parity"]
    print(f"written: {done.path} and {done.card_path} ({p['runtime']} on {p['n']} test images: top-1 agrees on "
          f"all, max |Δlogit| = {p['max_abs_logit_diff']:.2e} <= {p['tolerance']:g})")
    return 0


def _add_deploy_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("predict", cmd_predict, "classify image files with a run's model (a student or a teacher)",
            "Classify image files (PNG, JPEG, ...: whatever torchvision or PIL decodes; any size, grey or colour) "
            "with the model of RUN_DIR. Each image gets the run's own evaluation preprocessing: its channels "
            "(grey <-> RGB), its evaluation view at full resolution (image folders: resize + centre crop; "
            "28/32 px datasets: other sizes resized so the shorter side fits, centre square), the run's "
            "degradation to the student's size (without its random noise) and normalisation. Probabilities are "
            "calibrated with the run's T_cal when it has a calibration.json. One row per image: path, top-k "
            "classes and probabilities. Needs the run's dataset (class names, normalisation).")
    p.epilog = ("exit status: 0 every image predicted; 2 an error (bad option, missing run, unreadable file, no "
                "images), nothing written; 3 with --skip-bad-images: some files were unreadable and skipped "
                "(named on stderr), the others predicted and written")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or directories (searched recursively)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows to FILE (atomically; default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--format", default="csv", metavar="FMT", help="csv or jsonl (default: csv)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass (default: 256)")
    p.add_argument("--no-calibration", action="store_true", help="plain softmax(logits), ignoring calibration.json")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable files (exit status 3) instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("export", cmd_export, "export a run's model to ONNX or TorchScript with a model card",
            "Write the model of RUN_DIR as ONNX (dynamic batch, checked with onnx.checker) or TorchScript, and a "
            "model card (JSON, beside it: input size, channels, mean/std, class names, degradation, T_cal, "
            "cqkd version, sha256 of the weights, parity numbers). The exported file is run on the run's test "
            "split next to PyTorch; unless the top-1 agrees on every image and the logits within 1e-4, the "
            "export fails (exit 1) and nothing is written. ONNX needs the packages of `pip install 'cqkd[export]'`.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", metavar="FMT", help="onnx or torchscript (default: onnx)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the file to write (default: RUN_DIR/export/model[-preprocessing].onnx or .torchscript.pt); "
                        "the card goes to FILE's stem + .card.json")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="the graph takes uint8 images (N, C, S, S) at the full resolution and degrades and "
                        "normalises them itself (default: it takes the normalised student input)")
    p.add_argument("--parity-samples", type=int, default=None, metavar="N",
                   help="check parity on the first N test images only (default: the whole test split)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")


_EXTENSIONS.append(_add_deploy_commands)


def _quiet_libraries() -> None:
    """Keep Lightning's banners and known-harmless warnings out of the user's terminal."""
    import warnings

    os.environ["CQKD_QUIET_LIGHTNING"] = "1"
    for pattern in (".*LeafSpec.*", ".*does not have many workers.*", ".*Experiment logs directory.*",
                    ".*exists and is not empty.*", ".*litlogger.*",
                    r".*module\(s\) in eval mode.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cqkd`` command line on ``argv`` and return its exit status (errors become one line on stderr)."""
    from cqkd.core.signals import install_sigterm_handler

    _quiet_libraries()
    previous = install_sigterm_handler()  # SIGTERM stops every phase like Ctrl-C does: exit 143
    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, or a malformed option (its one line is printed)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        return args.func(args)
    except CqkdError as e:
        print(f"cqkd: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except RunInterrupted as e:
        out = getattr(args, "out", None)
        hint = f"; continue with: cqkd {args.command} --out {out} --resume" if out and e.checkpoint else ""
        print(f"cqkd: {one_line(e)}{hint}", file=sys.stderr)
        return e.exit_code
    except RunFailed as e:
        print(f"cqkd: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        os._exit(0)
    except OSError as e:  # a path the user named that the system refuses (too long, a loop, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"cqkd: error: {where}{one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cqkd: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
