"""Launching a sweep's runs as ``llamalab train`` subprocesses: finished runs are skipped, others resumed.

A run is finished when its metrics hold the validation record of its last step and the model of that step is on
disk (``final/``, or the checkpoint of the last step); anything less is launched again with ``--resume auto``,
which continues from its newest intact checkpoint. A run folder may hold only what ``llamalab train`` writes,
so each run's console output goes to ``logs/<run>.log`` and each launch (command, threads, wall time, exit
status) is recorded in ``logs/<run>.json``: the wall time, against the training time in the metrics, is the
run's overhead.

Where the runs are trained is an executor's business: ``LocalPool`` starts each as a fresh process of its own,
forked (on Linux) from a fork server that has imported the trainer once, which saves every run the seconds of
importing torch and llamalab (elsewhere: a ``python -m llamalab train`` subprocess), ``SubmititExecutor`` as jobs of a scheduler (Slurm, or submitit's own local executor) through ``submitit``, an
optional extra. Either runs the same command line into the same log and records the launch the same way (a job
adds its id); skipping, resuming and reporting failures do not depend on it.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import UserError
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


REPORTING_ONLY = {"logging"}  # config sections that change what a run reports, never what it trains


def _first_difference(trained: dict, planned: dict, prefix: str = "") -> str | None:
    """The first setting the run and the sweep both have with different values; a key only one of them has (a
    setting added to or removed from llamalab since) and the ``logging`` section are not differences."""
    for key in sorted(set(trained) & set(planned) - (REPORTING_ONLY if not prefix else set())):
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


@dataclass(frozen=True)
class Outcome:
    """How a launch ended: the run's exit status and wall time, or, for a job that never reported back (cancelled,
    timed out, its node lost), ``error``."""

    returncode: int | None
    wall_s: float | None
    threads: int | None = None
    error: str = ""


def _environment(threads: int | None) -> dict[str, str]:
    """This process's environment with the run's thread count (None: as set)."""
    return dict(os.environ) if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads),
                                                          MKL_NUM_THREADS=str(threads))


def _open_log(command: list[str], log_path: Path, env: dict[str, str]) -> TextIO:
    """``log_path`` opened for appending, after the line saying what is launched (the command a human reruns)."""
    log = open(log_path, "a")
    log.write(f"$ OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '')} {subprocess.list2cmdline(command)}\n")
    log.flush()
    return log


def _spawn(command: list[str], log_path: Path, threads: int | None) -> tuple[subprocess.Popen, TextIO]:
    """Start ``command`` with its output appended to ``log_path``, on ``threads`` CPU threads (None: as set)."""
    env = _environment(threads)
    log = _open_log(command, log_path, env)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log


def run_logged(command: list[str], log_path: str, threads: int | None) -> dict:
    """What a submitit job runs: ``command`` to its end, output appended to ``log_path``; threads None takes the
    CPUs Slurm gave the job (all this machine's otherwise). Returns the launch's exit status, wall time, threads."""
    if threads is None:
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or available_cpus()
    started = time.perf_counter()
    process, log = _spawn(command, Path(log_path), threads)
    try:
        with log:
            returncode = process.wait()
    except BaseException:  # cancelled or timed out: stop the run with the job
        process.terminate()
        process.wait()
        raise
    return {"returncode": returncode, "wall_s": round(time.perf_counter() - started, 3), "threads": threads}


class _Process:
    """A run trained by a subprocess of this one."""

    job_id = None

    def __init__(self, command: list[str], log_path: Path, threads: int):
        self.threads, self.started = threads, time.perf_counter()
        self.process, self.log = _spawn(command, log_path, threads)

    def done(self) -> bool:
        return self.process.poll() is not None

    def cancel(self) -> None:
        self.process.terminate()
        self.process.wait()

    def outcome(self) -> Outcome:
        self.log.close()
        return Outcome(self.process.returncode, round(time.perf_counter() - self.started, 3), self.threads)


# imported once by the fork server: the trainer, the CLI, pyplot (a run's loss plot) and torch's meta-device code
FORKSERVER_PRELOAD = ["llamalab.train.trainer", "llamalab.cli", "matplotlib.pyplot", "llamalab.scaling.fork_warmup"]


def _fork_server():
    """The multiprocessing context whose processes are forked from a server that has imported the trainer, or
    None where there is none (not Linux): runs are then ``python -m llamalab`` subprocesses."""
    if not sys.platform.startswith("linux") or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server starts: at the first run
    return context


def _forked_run(argv: list[str], log_path: str, threads: int, cwd: str, env: dict[str, str]) -> None:
    """A run in a process forked from the fork server: ``llamalab <argv>`` in this process's working directory and
    environment, on ``threads`` threads, its output appended to ``log_path``; exits with its exit status."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)  # OMP_NUM_THREADS for anything the run starts; torch read it at import, so:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", closefd=False)  # block-buffered, as a subprocess writing to a file
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        import torch

        torch.set_num_threads(threads)  # before any parallel work
        print(f"(forked from the llamalab fork server: torch.get_num_threads() = {torch.get_num_threads()})",
              flush=True)
        sys.argv = ["llamalab", *argv]
        runpy.run_module("llamalab", run_name="__main__", alter_sys=True)  # `python -m llamalab ARGV`
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what the interpreter does at exit (logging's flush, ...)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)


class _Forked:
    """A run trained by a process forked from the fork server."""

    job_id = None

    def __init__(self, context, command: list[str], log_path: Path, threads: int):
        self.threads, self.started = threads, time.perf_counter()
        env = _environment(threads)
        _open_log(command, log_path, env).close()
        self.process = context.Process(target=_forked_run, name=log_path.stem,
                                       args=(command[3:], str(log_path), threads, os.getcwd(), env))
        self.process.start()

    def done(self) -> bool:
        return self.process.exitcode is not None

    def cancel(self) -> None:
        self.process.terminate()
        self.process.join()

    def outcome(self) -> Outcome:
        self.process.join()
        return Outcome(self.process.exitcode, round(time.perf_counter() - self.started, 3), self.threads)


class LocalPool:
    """The runs as processes of their own, ``workers`` at a time, the CPU threads split between them: forked from
    the fork server where there is one, ``python -m llamalab`` subprocesses otherwise (or for another command)."""

    name = "local"
    poll_seconds = POLL_SECONDS

    def __init__(self, workers: int = 1):
        self.workers = workers
        self.fork_server = _fork_server()
        self._server_started = False

    def threads(self) -> int:
        return max(1, available_cpus() // self.workers)

    def start(self, run: PlannedRun | None, command: list[str], log_path: Path) -> _Forked | _Process:
        if self.fork_server is not None and command[:3] == [sys.executable, "-m", "llamalab"]:
            if not self._server_started:  # start it (imports: 2-3 s) before the first run's clock starts
                warm_up = self.fork_server.Process(target=os.getpid)
                warm_up.start()
                warm_up.join()
                self._server_started = True
            return _Forked(self.fork_server, command, log_path, self.threads())
        return _Process(command, log_path, self.threads())


class _Job:
    """A run trained by a submitit job (``run_logged``)."""

    def __init__(self, job, threads: int | None):
        self.job, self.job_id, self.threads = job, str(job.job_id), threads

    def done(self) -> bool:
        return self.job.done()

    def cancel(self) -> None:
        self.job.cancel(check=False)

    def outcome(self) -> Outcome:
        if not self.job.done():  # cancelled: do not wait for the scheduler to say so
            return Outcome(None, None, self.threads, error=f"job {self.job_id} cancelled")
        try:
            return Outcome(**self.job.result())
        except Exception as error:  # the job, not the run, failed: timed out, lost its node, could not start it
            # submitit's message: "Job ... has not produced any output (state: TIMEOUT)\n...", or the job's
            # traceback, its exception last, then "You can check full logs ..."
            lines = [line for line in str(error).split("\nYou can check")[0].splitlines() if line.strip("- ")]
            why = lines[1] if len(lines) > 1 and "has not produced any output" in lines[1] else (
                lines[-1] if lines else type(error).__name__)
            return Outcome(None, None, self.threads, error=f"job {self.job_id}: {why.strip()}; see "
                                                           f"{self.job.paths.stderr}")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor: submitit is not installed; pip install 'llamalab[slurm]' "
                        "(or 'submitit>=1.5')") from None
    return submitit


class SubmititExecutor:
    """The runs as submitit jobs: on Slurm (``cluster="slurm"``) or as local processes (``cluster="local"``),
    ``workers`` jobs at a time (None: all of them). ``slurm`` holds further ``slurm_<key>`` parameters of
    submitit's ``AutoExecutor`` (``qos``, ``account``, ``mem``, ``constraint``, ...)."""

    poll_seconds = 0.2

    def __init__(self, cluster: str, folder: Path, workers: int | None = None, timeout_min: int = 24 * 60,
                 cpus: int | None = None, gpus: int | None = None, partition: str | None = None,
                 slurm: dict | None = None):
        submitit = _submitit()
        self.name = "slurm" if cluster == "slurm" else f"submitit-{cluster}"
        self.workers, self.cluster, self.cpus = workers, cluster, cpus
        try:
            self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
            self.executor.update_parameters(timeout_min=timeout_min, cpus_per_task=cpus, gpus_per_node=gpus,
                                            slurm_partition=partition,
                                            **{f"slurm_{key}": value for key, value in (slurm or {}).items()})
        except (RuntimeError, NameError, ValueError, TypeError, AssertionError) as error:  # no srun, a bad key
            lines = str(error).strip().splitlines()
            raise UserError(f"--executor {self.name}: {lines[0] if lines else type(error).__name__}") from None

    def threads(self) -> int | None:
        """A Slurm job's threads: the CPUs it asked for (None: those it gets); local jobs split this machine's."""
        if self.cluster == "slurm":
            return self.cpus
        return max(1, available_cpus() // (self.workers or 1))

    def start(self, run: PlannedRun, command: list[str], log_path: Path) -> _Job:
        self.executor.update_parameters(name=run.name)
        threads, utils = self.threads(), _submitit().core.utils
        try:
            job = self.executor.submit(run_logged, command, str(log_path), threads)
        except (utils.FailedSubmissionError, utils.FailedJobError) as error:  # sbatch refused it (partition, ...)
            lines = str(error).strip().splitlines()
            raise UserError(f"--executor {self.name}: submitting {run.name} failed: "
                            f"{lines[-1] if lines else type(error).__name__}") from None
        return _Job(job, threads)


@dataclass
class _Launch:
    run: PlannedRun
    handle: _Forked | _Process | _Job
    records: list[dict]


def run_sweep(plan: Plan, workers: int | None = 1, echo=print, executor=None) -> tuple[list[str], list[str]]:
    """Train every run that is not finished, largest first (the shortest total time), through ``executor``
    (default: a ``LocalPool`` of ``workers`` processes) as many at a time as it takes; returns (launched, failed)
    run names."""
    executor = executor or LocalPool(workers or 1)
    statuses = {run.name: run_status(run) for run in plan.runs}
    stale = [(run, statuses[run.name]) for run in plan.runs if statuses[run.name].state == "stale"]
    if stale:
        run, status = stale[0]
        raise SweepError(f"{run.out_dir}: trained with other settings than the sweep gives now ({status.detail})"
                         f"{f', and {len(stale) - 1} more run(s)' if len(stale) > 1 else ''}; restore the sweep "
                         "file (or set that key in [overrides]) or move the run folder away")
    todo = sorted((run for run in plan.runs if statuses[run.name].state != "done"), key=lambda r: -r.flops)
    echo(f"{len(plan.runs) - len(todo)} of {len(plan.runs)} runs already finished; {len(todo)} to train")
    threads = executor.threads()
    running: list[_Launch] = []
    launched, failed = [], []
    try:
        while todo or running:
            while todo and (executor.workers is None or len(running) < executor.workers):
                run = todo.pop(0)
                running.append(_start(plan, run, executor, statuses[run.name]))
                launched.append(run.name)
                job = running[-1].handle.job_id
                echo(f"[{len(launched)}/{len(launched) + len(todo)}] {run.name}: {run.trained_tokens:,} tokens in "
                     f"{run.steps} steps, N = {run.params:,}, lr {run.lr:.3g}, "
                     + (f"{threads} thread(s)" if threads else "the job's CPUs")
                     + (f", resuming from step {statuses[run.name].step}" if statuses[run.name].step else "")
                     + (f", {executor.name} job {job}" if job else ""))
            time.sleep(executor.poll_seconds)
            for launch in [launch for launch in running if launch.handle.done()]:
                running.remove(launch)
                if not _finish(plan, launch, echo):
                    failed.append(launch.run.name)
    except BaseException:
        for launch in running:  # only the processes and jobs this sweep started
            launch.handle.cancel()
        for launch in running:
            _finish(plan, launch, echo)
        raise
    return launched, failed


def _start(plan: Plan, run: PlannedRun, executor, status: RunStatus) -> _Launch:
    log_path, _ = log_paths(plan, run)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = run.command(plan.sweep.base)
    record = {"command": command, "threads": executor.threads(), "resumed_from_step": status.step,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": None, "returncode": None,
              "executor": executor.name}
    records = launches(plan, run) + [record]
    _record(plan, run, records)
    try:
        handle = executor.start(run, command, log_path)
    except BaseException:
        _record(plan, run, records[:-1])  # never started
        raise
    if handle.job_id is not None:
        record["job_id"] = handle.job_id
        _record(plan, run, records)
    return _Launch(run=run, handle=handle, records=records)


def _finish(plan: Plan, launch: _Launch, echo) -> bool:
    """Record the launch; True when the run is now finished."""
    outcome = launch.handle.outcome()
    launch.records[-1].update(wall_s=outcome.wall_s, returncode=outcome.returncode, threads=outcome.threads)
    if outcome.error:
        launch.records[-1]["error"] = outcome.error
    _record(plan, launch.run, launch.records)
    took = f"{outcome.wall_s:.0f} s" if outcome.wall_s is not None else "an unknown time"
    done = result(plan, launch.run)
    if done is not None:
        echo(f"{launch.run.name}: finished in {took}, validation loss {done.val_loss:.4f}")
        return True
    log_path = log_paths(plan, launch.run)[0]
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.is_file() else []
    echo(f"{launch.run.name}: FAILED ({outcome.error or f'exit status {outcome.returncode}'}) after {took}; "
         f"{log_path}: {lines[-1] if lines else ''}")
    return False
