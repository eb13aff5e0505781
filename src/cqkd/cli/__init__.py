"""The ``cqkd`` command: parse, validate, call the library. Nothing more.

User mistakes raise ``CqkdError`` in the library; here they become one line on stderr and
exit code 2 (argparse does the same for malformed options).

The commands import the library inside their functions, deliberately: the library imports torch
and Lightning (~7 s), which `cqkd --help`, `cqkd COMMAND --help` and a malformed option never need.
Everything else in cqkd imports at the top of its module, except the optional backends (onnx,
onnxruntime, ray, timm, mlflow, tensorboard, wandb, matplotlib's figures), imported when asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import typing
import warnings
from collections.abc import Callable, Sequence

from cqkd import __version__
from cqkd.cli.common import EXIT_FAILED, EXIT_USAGE, one_line
from cqkd.cli.deploy import add_deploy_commands
from cqkd.cli.runs import add_run_commands
from cqkd.cli.sweeps import add_sweep_commands
from cqkd.core.signals import install_sigterm_handler
from cqkd.errors import CqkdError, RunFailed, RunInterrupted


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user mistake (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"cqkd: error: {self.prog}: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``cqkd`` argument parser with every subcommand."""
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

    add_run_commands(sub, add)
    add_sweep_commands(sub, add)
    add_deploy_commands(sub, add)
    return parser


def _quiet_libraries() -> None:
    """Keep Lightning's banners and known-harmless warnings out of the user's terminal."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database set-up notes (read when imported)
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "experiment not found, creating"
    for pattern in (".*LeafSpec.*", ".*does not have many workers.*", ".*Experiment logs directory.*",
                    ".*exists and is not empty.*", ".*litlogger.*",
                    r".*module\(s\) in eval mode.*", ".*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cqkd`` command line on ``argv`` and return its exit status (errors become one line on stderr)."""
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
        if args is not None and args.command == "demo":  # a sweep: the same command continues it
            hint = f"; continue with: {shlex.join(['cqkd', *(sys.argv[1:] if argv is None else map(str, argv))])}"
        else:
            hint = f"; continue with: cqkd {args.command} --out {shlex.quote(str(out))} --resume" \
                if out and e.checkpoint else ""
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
