"""Studies made of several runs: the default demo (and sweeps, see ``cqkd.sweep``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cqkd.config import RunConfig
from cqkd.runs import RunDir, write_text

# The default study: a 28 px teacher; supervised and CQKD students at 14 and 7 px.
# Sized to finish within 20 minutes on a 2-core CPU (measured: see README).
DEMO_TEACHER = dict(model="cnn-large", size=28, epochs=4)
DEMO_STUDENT = dict(model="cnn-small", epochs=4)
DEMO_SIZES = (14, 7)
DEMO_DISTILL = dict(temperature=20.0, alpha=0.5)
DEMO_TRAIN_SAMPLES: int | None = None


def _run(cfg: RunConfig, out: Path, force: bool, progress: bool) -> dict[str, Any]:
    from cqkd.training import fit_run

    run = RunDir(out)
    if run.is_finished and not force and run.config().digest() == cfg.digest():
        print(f"[skip] {out} is finished")
        return run.metrics()
    print(f"[run] {out}")
    return fit_run(cfg, out, force=True, progress=progress)


def run_demo(out: str | Path = "runs/demo", data_dir: str | None = None, epochs: int | None = None,
             train_samples: int | None = None, force: bool = False, progress: bool = True,
             dataset: str = "fashion-mnist") -> list[dict[str, Any]]:
    """Train the teacher, the supervised and the CQKD students; print and save a summary table."""
    from cqkd.report import markdown_table, print_rows

    out = Path(out)
    start = time.time()
    n = train_samples if train_samples is not None else DEMO_TRAIN_SAMPLES
    common = dict(dataset=dataset, data_dir=data_dir, train_samples=n, seed=0)
    t_over = {"epochs": epochs} if epochs else {}
    teacher_cfg = RunConfig.from_dict({**common, **DEMO_TEACHER, **t_over, "kind": "train"})
    rows = []
    m = _run(teacher_cfg, out / "teacher-28", force, progress)
    rows.append((m["size"], "teacher", m["model"], m["top1"], m["ece"], m["nll"], m["entropy"], m["flops"]))
    for size in DEMO_SIZES:
        sup = RunConfig.from_dict({**common, **DEMO_STUDENT, **t_over, "size": size, "kind": "train"})
        m = _run(sup, out / f"supervised-{size}", force, progress)
        rows.append((size, "supervised", m["model"], m["top1"], m["ece"], m["nll"], m["entropy"], m["flops"]))
        kd = RunConfig.from_dict({**common, **DEMO_STUDENT, **DEMO_DISTILL, **t_over, "size": size, "kind": "distill",
                                  "teacher": str(out / "teacher-28")})
        m = _run(kd, out / f"cqkd-{size}", force, progress)
        rows.append((size, f"cqkd T={m['temperature']:g}", m["model"], m["top1"], m["ece"], m["nll"], m["entropy"], m["flops"]))
    elapsed = time.time() - start
    headers = ("size", "method", "model", "top-1", "ECE", "NLL", "entropy", "FLOPs")
    print_rows("cqkd demo: test split", headers, rows)
    text = (f"# cqkd demo\n\nCommand: `cqkd demo --out {out}`"
            + (f" (epochs={epochs})" if epochs else "") + (f" (train_samples={n})" if n else "")
            + f"\n\nTest split of {dataset}; ECE with 15 equal-width bins; entropy in nats; FLOPs per image.\n\n"
            + markdown_table(headers, rows) + f"\nWall time: {elapsed / 60:.1f} min.\n")
    write_text(out / "summary.md", text)
    print(f"demo finished in {elapsed / 60:.1f} min; results: {out}/summary.md (runs under {out}/)")
    return [dict(zip(headers, r)) for r in rows]
