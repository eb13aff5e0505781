"""The commands of sweeps and their reports: sweep, report, report-conditions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cqkd.errors import CqkdError, RunInterrupted


def cmd_sweep(args: argparse.Namespace) -> int:
    """``cqkd sweep``: launch (or resume) a sweep's runs, or with ``--status`` print its progress."""
    from cqkd.sweep.launch import launch
    from cqkd.sweep.plan import load_sweep
    from cqkd.sweep.state import check_sweep_dir

    if args.status:
        from cqkd.cli.tables import sweep_status_table

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
    from cqkd.analysis.report import write_report

    paths = write_report(args.dir)
    print(f"report: {paths['report']}  table: {paths['csv']}  figures: {len(paths['figures'])}")
    return 0


def cmd_report_conditions(args: argparse.Namespace) -> int:
    """``cqkd report-conditions``: write the report comparing runs across conditions."""
    from cqkd.analysis.conditions import write_conditions_report

    print(f"report: {write_conditions_report(args.dir, args.main, args.out)}")
    return 0


def add_sweep_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
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


