"""Tables for the terminal: what the commands print (Markdown tables are in ``cqkd.core.text``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cqkd.analysis.runs import list_runs
from cqkd.core.text import fmt as _fmt
from cqkd.distill.methods import METHODS
from cqkd.distill.methods.base import STANDARDIZE, Method
from cqkd.nets.registry import MODELS, build_model, count_flops, count_params
from cqkd.sweep.runner import STALE_AFTER
from cqkd.sweep.status import sweep_status

_MAIN_KEYS = ("top1", "top5", "nll", "brier", "ece", "adaptive_ece", "classwise_ece", "mce", "rmsce",
              "ece_over", "ece_under", "entropy", "confidence")


def metrics_table(title: str, metrics: dict[str, Any]) -> None:
    """Print a run's metrics as a two-column table."""

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in _MAIN_KEYS:
        if key in metrics:
            table.add_row(key, _fmt(metrics[key]))
    for key in ("model", "size", "params", "flops", "epochs", "seed", "temperature", "temperature_mode", "alpha",
                "t_cal", "teacher_calibration", "teacher_temperature_applied", "kl_teacher_student"):
        if metrics.get(key) is not None:
            table.add_row(key, _fmt(metrics[key]))
    for prefix in ("teacher_metrics", "teacher_lr_metrics"):
        for key, value in (metrics.get(prefix) or {}).items():
            table.add_row(f"{prefix}.{key}", _fmt(value))
    Console().print(table)


def print_rows(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` under ``headers`` as a rich table titled ``title``."""

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("method", "model", "run") else "right", no_wrap=h in ("method", "model"))
    for row in rows:
        table.add_row(*(_fmt(c) for c in row))
    Console().print(table)


def models_table(size: int, channels: int, classes: int) -> None:
    """Print the model registry with parameters and forward FLOPs at ``size``."""

    rows = []
    for name, spec in MODELS.items():
        if size < spec.min_size:
            rows.append((name, spec.family, "-", "-", spec.description))
            continue
        model = build_model(name, classes, channels, size)
        rows.append((name, spec.family, f"{count_params(model) / 1e6:.3f}M",
                     f"{count_flops(model, channels, size) / 1e6:.2f}M", spec.description))
    rows.append(("timm:NAME", "timm", "", "", "any timm model, e.g. timm:resnet18"))
    rows.append(("<torchvision name>", "torchvision", "", "", "any torchvision classification model"))
    print_rows(f"models (FLOPs per image at {size}x{size}x{channels})", ("model", "family", "params", "FLOPs", "description"), rows)


def runs_table(root: str) -> None:
    """Print the run directories under ``root`` with their state and headline metrics."""


    rows = list_runs(root)
    table = Table(title=f"runs under {root}", show_header=True)
    # the run name folds onto several lines in a narrow terminal; the short columns never wrap
    table.add_column("run", overflow="fold", ratio=1)
    for name, justify in (("state", "left"), ("kind", "left"), ("model", "left"),
                          ("size", "right"), ("top1", "right"), ("ece", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("note", overflow="fold", max_width=30)
    colours = {"finished": "green", "running": "yellow", "failed": "red"}
    for r in rows:
        state = f"[{colours.get(r['state'], 'white')}]{r['state']}[/]"
        table.add_row(r["run"], state, *("" if r[k] is None else _fmt(r[k]) for k in ("kind", "model", "size", "top1", "ece")),
                      r["note"][:60])
    console = Console()
    console.print(table)
    if not rows:
        console.print(f"no run directories (with config.yaml) under {root}")


def calibration_table(run: str, result: dict[str, Any]) -> None:
    """Print ``calibrate_run``'s result: NLL and ECE before and after temperature scaling."""

    split = result["split"]
    table = Table(title=f"temperature scaling of {run}", caption=f"T_cal = {result['t_cal']:.4f}, fitted on {split} "
                  f"(n = {result['n_fit']}); ECE with {result['ece_bins']} equal-width bins")
    for h in ("split", "n", "top1", "NLL before", "NLL after", "ECE before", "ECE after"):
        table.add_column(h, justify="left" if h == "split" else "right")
    for name, m in result["metrics"].items():
        label = f"{name} (fit)" if name == split else name
        table.add_row(label, str(m["n"]), _fmt(m["top1"]), _fmt(m["nll_before"]), _fmt(m["nll_after"]),
                      _fmt(m["ece_before"]), _fmt(m["ece_after"]))
    Console().print(table)
    if result.get("at_bound"):
        Console(stderr=True).print("[yellow]note: T_cal lies at the edge of the search range [0.01, 100][/]")


def intervals_table(title: str, intervals: dict[str, dict[str, float]]) -> None:
    """Print bootstrap intervals: metric, value, low, high."""

    table = Table(title=title)
    for h in ("metric", "value", "low", "high"):
        table.add_column(h, justify="left" if h == "metric" else "right")
    for key, v in intervals.items():
        table.add_row(key, _fmt(v["value"]), _fmt(v["low"]), _fmt(v["high"]))
    Console().print(table)


def sweep_status_table(out: str, stale_after: float | None = None) -> None:
    """Print who runs what in a sweep directory: counts, running runs with their worker, workers, failures."""

    s = sweep_status(out, STALE_AFTER if stale_after is None else stale_after)
    console = Console(highlight=False)
    order = ("finished", "failed", "running", "interrupted", "pending", "external")
    counts = ", ".join(f"{s['counts'][k]} {k}" for k in order if s["counts"].get(k))
    waiting = f" ({s['waiting']} waiting for their teacher)" if s["waiting"] else ""
    console.print(escape(f"sweep {out}: {s['total']} runs: {counts}{waiting}"), soft_wrap=True)
    if s["running"]:
        table = Table(title="running", show_header=True)
        for name in ("run", "worker", "heartbeat", "started", "epoch", "val top-1"):
            table.add_column(name, overflow="fold")
        for r in s["running"]:
            beat = "no claim" if r["heartbeat_s"] is None else f"{r['heartbeat_s']:.0f} s ago"
            epoch = "" if r["epoch"] is None else f"{r['epoch']}/{r['epochs'] or '?'}"
            top1 = "" if r["val_top1"] is None else f"{r['val_top1']:.4f}"
            table.add_row(escape(r["run"]), r["worker"], beat + (" [red](stale)[/red]" if r["stale"] else ""),
                          r["started"] or "", epoch, top1)
        console.print(table)
    if s["workers"]:
        table = Table(title="workers", show_header=True)
        for name in ("worker", "heartbeat", "state", "run"):
            table.add_column(name, overflow="fold")
        for w in s["workers"]:
            table.add_row(w["worker"], f"{w['heartbeat_s']:.0f} s ago",
                          "[green]alive[/green]" if w["alive"] else "[red]stale[/red]", escape(w["run"] or "(waiting)"))
        console.print(table)
    for name, error in s["failed"].items():
        console.print(escape(f"failed: {name}: {error}"), soft_wrap=True)


def methods_table() -> None:
    """Print the distillation methods: options with defaults and ranges, what each needs, its paper."""
    rows = []
    for name, cls in METHODS.items():
        options = dict(cls.options)
        if cls.logit_method:
            options["standardize"] = STANDARDIZE
        opts = ", ".join(f"{k}={o.describe()}" for k, o in options.items()) or "-"
        if name in ("kd", "ctkd"):
            opts = ("T=--temperature, " if name == "kd" else "") + "alpha=--alpha, " + opts
        own = cls.build is not Method.build
        rows.append((name, opts, cls.needs.describe(own), cls.paper))
    print_rows("cqkd methods (--method NAME[,key=value...])", ("method", "options (default, range)", "needs", "paper"),
               rows)


def shift_table(run: str, rows: list[dict[str, Any]], errors: dict[str, dict[str, float]] | None = None,
                baseline: str | None = None) -> None:
    """Print a run's shift evaluation: top-1, ECE and ECE with T_cal at severities 1/3/5, and CE against a baseline."""
    by = {(r["corruption"], r["severity"]): r for r in rows}

    def at(c: str, m: str) -> str:
        if c == "none":
            return f"{by[('none', 0)][m]:.3f}"
        return " ".join(f"{by[(c, s)][m]:.3f}" if (c, s) in by else "-" for s in (1, 3, 5))

    headers = ["corruption", "top-1 s1 s3 s5", "ECE s1 s3 s5", "ECE/T_cal s1 s3 s5"]
    if errors is not None:
        headers += ["CE", "rel. CE"]
    out = []
    for c in dict.fromkeys(r["corruption"] for r in rows):
        line: list[Any] = ["clean" if c == "none" else c, at(c, "top1"), at(c, "ece"), at(c, "ece_cal")]
        if errors is not None:
            e = errors.get(c)
            line += [f"{e['ce']:.3f}", f"{e['relative_ce']:.3f}"] if e else ["", ""]
        out.append(line)
    if errors is not None:
        out.append(["mCE", "", "", "", f"{errors['mean']['ce']:.3f}", f"{errors['mean']['relative_ce']:.3f}"])
    title = f"shift evaluation of {run} (T_cal = {_fmt(rows[0]['t_cal'])})"
    if baseline is not None:
        title += f"; CE relative to {baseline}"
    print_rows(title, headers, out)
