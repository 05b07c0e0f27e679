"""Launching a sweep's runs as ``llamalab train`` subprocesses: finished runs are skipped, others resumed.

A run is finished when its metrics hold the validation record of its last step and the model of that step is on
disk (``final/``, or the checkpoint of the last step); anything less is launched again with ``--resume auto``,
which continues from its newest intact checkpoint. A run folder may hold only what ``llamalab train`` writes,
so each run's console output goes to ``logs/<run>.log`` and each launch (command, threads, wall time, exit
status) is recorded in ``logs/<run>.json``: the wall time, against the training time in the metrics, is the
run's overhead.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..fs import atomic_write_bytes
from ..train.checkpoint import list_checkpoints, step_dir_name
from ..train.metrics import read_metrics
from .sweep import Plan, PlannedRun, SweepError

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class RunStatus:
    state: str  # "done", "partial" (started; resumes from `step`), "new", "stale" (trained with other settings)
    step: int = 0
    detail: str = ""


@dataclass(frozen=True)
class RunResult:
    """A finished run, as the report reads it."""

    run: PlannedRun
    val_loss: float
    val_bpb: float
    train_seconds: float | None  # from the metrics: training only, summed over resumed sessions
    wall_seconds: float | None  # from the launch records: start-up, validation and checkpoints included

    @property
    def overhead_seconds(self) -> float | None:
        if self.train_seconds is None or self.wall_seconds is None:
            return None
        return self.wall_seconds - self.train_seconds


def _first_difference(trained: dict, planned: dict, prefix: str = "") -> str | None:
    """The first setting the run and the sweep both have with different values; a key only one of them has (a
    setting added to or removed from llamalab since) is not a difference."""
    for key in sorted(set(trained) & set(planned)):
        a, b = trained[key], planned[key]
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} in the run, {b!r} in the sweep"
    return None


def _metrics(run: PlannedRun) -> list[dict]:
    path = run.out_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _final_validation(records: list[dict], run: PlannedRun) -> dict | None:
    return next((r for r in records if r.get("split") == "val" and r.get("step") == run.steps), None)


def run_status(run: PlannedRun) -> RunStatus:
    if not run.out_dir.exists():
        return RunStatus("new")
    config = run.out_dir / "config.json"
    if config.is_file():
        difference = _first_difference(json.loads(config.read_text()), run.config.to_dict())
        if difference:
            return RunStatus("stale", detail=difference)
    last = run.out_dir / "checkpoints" / step_dir_name(run.steps) / "COMPLETE"
    model_saved = (run.out_dir / "final" / "config.json").is_file() or last.is_file()
    if model_saved and _final_validation(_metrics(run), run) is not None:
        return RunStatus("done", step=run.steps)
    found = list_checkpoints(run.out_dir / "checkpoints")
    return RunStatus("partial", step=found[0][0] if found else 0)


def log_paths(plan: Plan, run: PlannedRun) -> tuple[Path, Path]:
    """(console log, launch records) of a run."""
    folder = plan.sweep.out_dir / "logs"
    return folder / f"{run.name}.log", folder / f"{run.name}.json"


def launches(plan: Plan, run: PlannedRun) -> list[dict]:
    path = log_paths(plan, run)[1]
    return json.loads(path.read_text())["launches"] if path.is_file() else []


def _record(plan: Plan, run: PlannedRun, records: list[dict]) -> None:
    atomic_write_bytes(log_paths(plan, run)[1], (json.dumps({"launches": records}, indent=1) + "\n").encode())


def result(plan: Plan, run: PlannedRun) -> RunResult | None:
    """The finished run's final validation and times, or None when it is not finished."""
    if run_status(run).state != "done":
        return None
    records = _metrics(run)
    val = _final_validation(records, run)
    timed = [r["train_seconds"] for r in records if r.get("split") == "train" and "train_seconds" in r]
    walls = [launch["wall_s"] for launch in launches(plan, run)]
    wall = sum(walls) if walls and None not in walls else None
    return RunResult(run=run, val_loss=val["loss"], val_bpb=val["bpb"], train_seconds=timed[-1] if timed else None,
                     wall_seconds=wall)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _Launch:
    run: PlannedRun
    process: subprocess.Popen
    log: TextIO
    records: list[dict]
    started: float


def run_sweep(plan: Plan, workers: int = 1, echo=print) -> tuple[list[str], list[str]]:
    """Train every run that is not finished, ``workers`` at a time with the CPU threads split between them,
    largest first (the shortest total time); returns (launched, failed) run names."""
    statuses = {run.name: run_status(run) for run in plan.runs}
    stale = [(run, statuses[run.name]) for run in plan.runs if statuses[run.name].state == "stale"]
    if stale:
        run, status = stale[0]
        raise SweepError(f"{run.out_dir}: trained with other settings than the sweep gives now ({status.detail})"
                         f"{f', and {len(stale) - 1} more run(s)' if len(stale) > 1 else ''}; restore the sweep "
                         "file (or set that key in [overrides]) or move the run folder away")
    todo = sorted((run for run in plan.runs if statuses[run.name].state != "done"), key=lambda r: -r.flops)
    echo(f"{len(plan.runs) - len(todo)} of {len(plan.runs)} runs already finished; {len(todo)} to train")
    threads = max(1, available_cpus() // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: list[_Launch] = []
    launched, failed = [], []
    try:
        while todo or running:
            while todo and len(running) < workers:
                run = todo.pop(0)
                running.append(_start(plan, run, threads, env, statuses[run.name]))
                launched.append(run.name)
                echo(f"[{len(launched)}/{len(launched) + len(todo)}] {run.name}: {run.trained_tokens:,} tokens in "
                     f"{run.steps} steps, N = {run.params:,}, lr {run.lr:.3g}, {threads} thread(s)"
                     + (f", resuming from step {statuses[run.name].step}" if statuses[run.name].step else ""))
            time.sleep(POLL_SECONDS)
            for launch in [launch for launch in running if launch.process.poll() is not None]:
                running.remove(launch)
                if not _finish(plan, launch, echo):
                    failed.append(launch.run.name)
    except BaseException:
        for launch in running:  # only the processes this sweep started
            launch.process.terminate()
        for launch in running:
            launch.process.wait()
            _finish(plan, launch, echo)
        raise
    return launched, failed


def _start(plan: Plan, run: PlannedRun, threads: int, env: dict, status: RunStatus) -> _Launch:
    log_path, _ = log_paths(plan, run)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = run.command(plan.sweep.base)
    log = open(log_path, "a")
    log.write(f"$ OMP_NUM_THREADS={threads} {subprocess.list2cmdline(command)}\n")
    log.flush()
    records = launches(plan, run) + [{"command": command, "threads": threads, "resumed_from_step": status.step,
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": None,
                                      "returncode": None}]
    _record(plan, run, records)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    return _Launch(run=run, process=process, log=log, records=records, started=time.perf_counter())


def _finish(plan: Plan, launch: _Launch, echo) -> bool:
    """Record the launch; True when the run is now finished."""
    wall = time.perf_counter() - launch.started
    launch.log.close()
    launch.records[-1].update(wall_s=round(wall, 3), returncode=launch.process.returncode)
    _record(plan, launch.run, launch.records)
    done = result(plan, launch.run)
    if done is not None:
        echo(f"{launch.run.name}: finished in {wall:.0f} s, validation loss {done.val_loss:.4f}")
        return True
    log_path = log_paths(plan, launch.run)[0]
    lines = log_path.read_text(errors="replace").strip().splitlines()
    echo(f"{launch.run.name}: FAILED (exit status {launch.process.returncode}) after {wall:.0f} s; {log_path}: "
         f"{lines[-1] if lines else ''}")
    return False
