"""Who runs what in a sweep directory: run states, live claims and workers, read from its files."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

from cqkd.errors import CqkdError
from cqkd.sweep.claims import age, read_held
from cqkd.sweep.state import SweepDir


def sweep_status(out: str | os.PathLike, stale_after: float) -> dict[str, Any]:
    """Counts by state, the running runs with their worker and heartbeat age, the workers, the failures."""
    sd = SweepDir(out)
    if not sd.state_file.exists():
        raise CqkdError(f"{str(out)!r} holds no sweep.json (not a sweep directory, or not started)")
    state = sd.load()
    runs = state["runs"]
    plan = [item for item in state.get("plan", []) if item["name"] in runs]
    states = {item["name"]: runs[item["name"]].get("state", "?") for item in plan}

    def waits(item: dict[str, Any]) -> bool:
        teacher = runs.get(f"teachers/{item['teacher']}", {}) if item.get("teacher") else {}
        return states[item["name"]] in ("pending", "interrupted") and teacher.get("state") not in (None, "finished",
                                                                                                    "external")

    running = []
    for name in (n for n, s in states.items() if s == "running"):
        claim = read_held(sd.claim_file(name)) or {}
        running.append({"run": name, "worker": f"{claim.get('host', '?')}:{claim.get('pid', '?')}",
                        "heartbeat_s": age(claim) if claim else None, "started": runs[name].get("started"),
                        "stale": not claim or age(claim) >= stale_after,
                        **latest_epoch(Path(out) / name, runs[name].get("config") or {})})
    workers = []
    for f in sorted(sd.workers.glob("*.json")) if sd.workers.is_dir() else []:
        info = read_held(f)
        if info is not None:
            workers.append({"worker": f"{info.get('host')}:{info.get('pid')}", "heartbeat_s": age(info),
                            "alive": age(info) < stale_after, "run": info.get("run")})
    return {"out": str(out), "total": len(plan), "counts": dict(Counter(states.values())), "running": running,
            "waiting": sum(waits(item) for item in plan), "workers": workers,
            "failed": {n: runs[n].get("error") for n, s in states.items() if s == "failed"},
            "total_wall_s": state.get("total_wall_s")}


def latest_epoch(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A running run's last validated epoch (1-based, of ``config['epochs']``) and its val top-1, read from
    its metrics.csv; None for both before its first validation (or if the file cannot be read)."""
    epoch = top1 = None
    try:
        with open(run_dir / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/top1") not in (None, "") and row.get("epoch") not in (None, ""):
                    epoch, top1 = int(float(row["epoch"])) + 1, float(row["val/top1"])
    except (OSError, ValueError, csv.Error):
        pass
    epochs = config.get("epochs") if isinstance(config.get("epochs"), int) else None
    return {"epoch": epoch, "epochs": epochs, "val_top1": top1}
