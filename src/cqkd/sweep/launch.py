"""Starting sweep workers: in this process, as N local processes, or as N Ray tasks; watched from here."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cqkd.errors import CqkdError
from cqkd.sweep.claims import host
from cqkd.sweep.plan import SweepPlan, plan_sweep
from cqkd.sweep.progress import SweepProgress, summary
from cqkd.sweep.runner import STALE_AFTER, prepare_trackers, run_sweep
from cqkd.sweep.state import SweepDir

LAUNCHERS = ("local", "ray")
EXIT_INTERRUPTED = {"Ctrl-C": 130, "SIGTERM": 143}


def cpu_count() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch(plan: SweepPlan, workers: int | None = None, launcher: str = "local", threads: int | None = None,
           devices_per_worker: int = 0, address: str | None = None, force: bool = False,
           stale_after: float | None = None, progress: bool = True, dry_run: bool = False) -> int:
    """Run a sweep: in this process (``workers`` None), as local worker processes or as Ray tasks.
    The exit status: 0 when every run finished, 1 when one failed, 130/143 when interrupted."""
    stale_after = STALE_AFTER if stale_after is None else stale_after
    if not stale_after > 0:
        raise CqkdError(f"--stale-after must be > 0 seconds, got {stale_after}")
    for name, value in (("--workers", workers), ("--threads-per-worker", threads)):
        if value is not None and value < 1:
            raise CqkdError(f"{name} must be at least 1, got {value}")
    if devices_per_worker < 0:
        raise CqkdError(f"--devices-per-worker must be >= 0, got {devices_per_worker}")
    if launcher not in LAUNCHERS:
        raise CqkdError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if address is not None and launcher != "ray":
        raise CqkdError("--address names a Ray cluster: give it with --launcher ray")
    if dry_run:
        return 0 if run_sweep(plan, force, dry_run=True).ok else 1
    prepare_trackers(plan)
    if launcher == "ray":
        return launch_ray(plan, workers, threads, devices_per_worker, address, force, stale_after, progress)
    if workers is None:
        if devices_per_worker:
            raise CqkdError("--devices-per-worker gives each of --workers N processes its GPUs: give --workers")
        return 0 if run_sweep(plan, force, progress=progress, stale_after=stale_after, threads=threads).ok else 1
    return launch_local(plan, workers, threads, devices_per_worker, force, stale_after, progress)


def worker_command(plan: SweepPlan, threads: int, force: bool, stale_after: float) -> list[str]:
    """The command line of one plain worker of ``plan``."""
    if not Path(plan.source).is_file():
        raise CqkdError(f"worker processes read the sweep from its file; {plan.source!r} is not one")
    return [sys.executable, "-m", "cqkd", "sweep", plan.source, "--out", str(plan.out), "--quiet",
            "--threads-per-worker", str(threads), "--stale-after", f"{stale_after:g}", *(["--force"] if force else [])]


def launch_local(plan: SweepPlan, workers: int, threads: int | None, devices_per_worker: int, force: bool,
                 stale_after: float, progress: bool) -> int:
    """Start ``workers`` worker processes here, each with its CPU threads (and GPUs); watch them."""
    threads = threads or max(1, cpu_count() // workers)
    gpus = gpu_groups(workers, devices_per_worker)
    cmd = worker_command(plan, threads, force, stale_after)
    logs = SweepDir(plan.out).logs
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen, Path]] = []
    for i, devices in enumerate(gpus):
        env = child_env(threads, devices)
        log = logs / f"{host()}-worker-{i}.log"
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {' '.join(cmd)}\n")
            f.flush()
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
    stopped: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        stopped.append("SIGTERM")
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        devices = f", GPUs {' | '.join(g for g in gpus if g)}" if devices_per_worker else ""
        return _watch(plan, f"{workers} worker processes × {threads} CPU thread(s){devices}; logs: {logs}",
                      lambda: all(p.poll() is not None for p, _ in procs), stopped,
                      lambda: [_report_exit(i, p.returncode, log) for i, (p, log) in enumerate(procs)], progress)
    finally:
        signal.signal(signal.SIGTERM, previous)


def gpu_groups(workers: int, per_worker: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each worker: ``per_worker`` of the visible GPUs each (None: leave it)."""
    if not per_worker:
        return [None] * workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < workers * per_worker:
        raise CqkdError(f"--workers {workers} x --devices-per-worker {per_worker} needs {workers * per_worker} GPUs; "
                        f"{len(ids)} visible")
    return [",".join(ids[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def child_env(threads: int, devices: str | None) -> dict[str, str]:
    """A worker process's environment: its CPU threads, its GPUs, the import path made absolute."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


def _report_exit(i: int, code: int | None, log: Path) -> str | None:
    if code in (0, 1, 130, 143):  # done, some run failed, interrupted: the summary tells
        return None
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return f"worker {i} exited with status {code}" + (f": {lines[-1]}" if lines else "") + f" (log: {log})"


def _watch(plan: SweepPlan, what: str, ended: Callable[[], bool], stopped: list[str],
           problems: Callable[[], list[str | None]], progress: bool) -> int:
    """Show the sweep's progress until the workers have ended; then the summary and the exit status."""
    start = time.time()
    sd = SweepDir(plan.out)
    display = SweepProgress(plan, bar=progress)
    display.say(f"sweep {plan.source}: {len(plan.runs)} runs; {what}; out: {plan.out}")
    with display:
        while True:
            try:
                finished = ended()
                with contextlib.suppress(CqkdError):
                    display.update(sd.load())
                if finished:
                    break
                time.sleep(1.0)
            except KeyboardInterrupt:
                stopped.append("Ctrl-C")  # the workers had it too (one process group): wait for them
    for line in problems():
        if line:
            display.say(line)
    state = sd.load()
    sessions = [i for i in state["invocations"] if (i.get("start_s") or 0) >= start - 1]
    ran = sum(i.get("ran", 0) for i in sessions)
    for line in summary(plan, state, time.time() - start, ran, sessions[0]["skipped"] if sessions else 0):
        display.say(line)
    if stopped:
        return EXIT_INTERRUPTED[stopped[0]]
    runs = state["runs"]
    return 0 if all(runs.get(r.name, {}).get("state") in ("finished", "external") for r in plan.runs) else 1


def launch_ray(plan: SweepPlan, workers: int | None, threads: int | None, devices_per_worker: int,
               address: str | None, force: bool, stale_after: float, progress: bool) -> int:
    """Run the workers as Ray tasks on a cluster (``address``) or on a local Ray instance (None, "local")."""
    try:
        import ray  # optional backend: imported only when asked for
    except ImportError:
        raise CqkdError("--launcher ray needs Ray: pip install 'cqkd[ray]'") from None

    threads = threads or 1
    local = address in (None, "local")
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if local:
        path = child_env(threads, None).get("PYTHONPATH")
        ray.init(num_cpus=cpu_count(), runtime_env={"env_vars": {"PYTHONPATH": path}} if path else None, **options)
    else:
        ray.init(address=address, **options)
    try:
        if workers is None:
            have = ray.cluster_resources()
            workers = max(1, int(have.get("GPU", 0) // devices_per_worker if devices_per_worker
                                 else have.get("CPU", 1) // threads))
        task = ray.remote(ray_worker).options(num_cpus=threads, num_gpus=devices_per_worker)
        refs = [task.remote(plan.raw, str(plan.out), plan.source, os.getcwd(), force, stale_after, threads,
                            f"ray-{i}") for i in range(workers)]
        stopped: list[str] = []

        def ended() -> bool:
            if stopped and stopped[-1] != "cancelled":
                for ref in refs:
                    ray.cancel(ref)  # a KeyboardInterrupt in each task: its run saves a checkpoint
                stopped.append("cancelled")
            return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

        gpus = f" × {devices_per_worker} GPUs" if devices_per_worker else ""
        where = "a local Ray instance" if local else address
        return _watch(plan, f"{workers} Ray tasks × {threads} CPUs{gpus} on {where}", ended, stopped,
                      lambda: [_ray_problem(i, ray, ref) for i, ref in enumerate(refs)], progress)
    finally:
        ray.shutdown()


def _ray_problem(i: int, ray: Any, ref: Any) -> str | None:
    try:
        ray.get(ref)
    except Exception as e:  # noqa: BLE001  a task's error, shown as one line
        first = str(e).strip().splitlines()
        return f"Ray task {i} failed: {first[-1] if first else type(e).__name__}"
    return None


def ray_worker(raw: dict[str, Any], out: str, source: str, cwd: str, force: bool, stale_after: float,
               threads: int, name: str) -> list[str]:
    """One sweep worker inside a Ray task (in the driver's working directory, its output in a log)."""
    os.chdir(cwd)
    plan = plan_sweep(raw, out, where=source)
    log = SweepDir(out).logs / f"{host()}-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run_sweep(plan, force, progress=False, stale_after=stale_after, threads=threads).ran
