"""``llamalab scaling run --executor slurm|submitit-local``: the sweep's runs as submitit jobs, tested through
submitit's local executor (no Slurm needed): the same runs, bit for bit, as the local process pool, the same launch
records with the job ids, the same skip and failure reports; the Slurm executor gets the options it was given.

A small sweep (one budget, two shapes) is trained twice per module: by the local pool and by submitit's jobs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llamalab.commands.scaling import build_parser, make_executor
from llamalab.scaling.sweep import load_sweep, plan

sys.path.insert(0, str(Path(__file__).parent))
from test_sweep import FAMILY, base_config, cli, launches, write_sweep  # noqa: E402
from train_helpers import write_prepared  # noqa: E402  (on the path through test_sweep)

try:
    import submitit  # noqa: F401
    HAVE_SUBMITIT = True
except ImportError:
    HAVE_SUBMITIT = False
needs_submitit = pytest.mark.skipif(not HAVE_SUBMITIT, reason="submitit is not installed (pip install 'llamalab[slurm]')")
SMALL = {"budgets": [5e8], "family": {**FAMILY, "dims": [16, 32]}}  # two runs of a few seconds


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submitit")
    prepared = write_prepared(tmp / "prepared")
    base = tmp / "base.toml"
    base.write_text(base_config(prepared))
    return tmp, base


@pytest.fixture(scope="module")
def farmed(setup):
    """The small sweep trained by the local pool and by submitit-local jobs, 2 at a time each;
    (local out_dir, submitit sweep file, submitit out_dir, submitit run output)."""
    if not HAVE_SUBMITIT:
        pytest.skip("submitit is not installed")
    tmp, base = setup
    local = write_sweep(tmp / "local.toml", base, tmp / "local", **SMALL)
    rc, out, err = cli("scaling", "run", str(local), "--workers", "2", "--no-report")
    assert rc == 0, (out, err)
    path = write_sweep(tmp / "farmed.toml", base, tmp / "farmed", **SMALL)
    rc, out, err = cli("scaling", "run", str(path), "--executor", "submitit-local", "--workers", "2")
    assert rc == 0, (out, err)
    return tmp / "local", path, tmp / "farmed", out


def final_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("split") == "val"][-1]["loss"]


@needs_submitit
@pytest.mark.slow
def test_submitit_jobs_train_the_same_runs_as_the_local_pool(farmed):
    local, path, out_dir, output = farmed
    assert "0 of 2 runs already finished; 2 to train" in output
    names = sorted(p.name for p in (local / "runs").iterdir())
    assert names == ["5e8-d16l1h2-s0", "5e8-d32l2h4-s0"]
    assert sorted(p.name for p in (out_dir / "runs").iterdir()) == names
    planned = plan(load_sweep(path))
    runs = {run.name: run for run in planned.runs}
    for name in names:
        assert final_val_loss(out_dir / "runs" / name) == pytest.approx(final_val_loss(local / "runs" / name),
                                                                        rel=1e-6)
        [launch] = launches(out_dir, name)
        assert launch["executor"] == "submitit-local" and launch["returncode"] == 0 and launch["wall_s"] > 0
        assert launch["command"] == runs[name].command(planned.sweep.base)  # the runner's
        assert [a.replace(str(out_dir), str(local)) for a in launch["command"]] == launches(local, name)[0]["command"]
        assert launch["threads"] == launches(local, name)[0]["threads"]
        assert f"submitit-local job {launch['job_id']}" in output
        assert (out_dir / "logs" / "submitit" / f"{launch['job_id']}_0_log.out").is_file()  # submitit's own job log
        log = (out_dir / "logs" / f"{name}.log").read_text()  # the run's output, where the local pool puts it
        assert log.startswith(f"$ OMP_NUM_THREADS={launch['threads']} ") and "val" in log
    assert "2 of 2 planned runs finished" in (out_dir / "report" / "report.md").read_text()


@needs_submitit
@pytest.mark.slow
def test_rerun_through_submitit_trains_nothing(farmed):
    _, path, out_dir, _ = farmed
    rc, out, _ = cli("scaling", "run", str(path), "--executor", "submitit-local")
    assert rc == 0 and "2 of 2 runs already finished; 0 to train" in out
    assert all(len(launches(out_dir, p.stem)) == 1 for p in (out_dir / "logs").glob("*.json"))


@needs_submitit
def test_a_failed_job_run_is_reported_like_a_local_failure(setup, monkeypatch):
    """The run's command exits 3 inside its job: recorded with the job id, reported FAILED, `run` exits 1."""
    from llamalab.scaling.sweep import PlannedRun

    tmp, base = setup
    path = write_sweep(tmp / "failing.toml", base, tmp / "failing", **{**SMALL, "family": {**FAMILY, "dims": [16]}})
    monkeypatch.setattr(PlannedRun, "command", lambda self, base: [
        sys.executable, "-c", "import sys; print('no good'); sys.exit(3)"])
    rc, out, _ = cli("scaling", "run", str(path), "--executor", "submitit-local", "--no-report")
    assert rc == 1
    assert "5e8-d16l1h2-s0: FAILED (exit status 3)" in out and out.rstrip().endswith("again resumes them")
    assert "failing/logs/5e8-d16l1h2-s0.log: no good" in out
    [launch] = launches(tmp / "failing", "5e8-d16l1h2-s0")
    assert launch["returncode"] == 3 and launch["job_id"] and launch["wall_s"] is not None


@needs_submitit
def test_a_failed_job_is_reported_with_its_reason(setup, monkeypatch):
    """The job itself fails (here: its command cannot start): no exit status, the job's state and log named."""
    from llamalab.scaling.sweep import PlannedRun

    tmp, base = setup
    path = write_sweep(tmp / "lost.toml", base, tmp / "lost", **{**SMALL, "family": {**FAMILY, "dims": [16]}})
    monkeypatch.setattr(PlannedRun, "command", lambda self, base: [str(tmp / "no-such-python")])
    rc, out, _ = cli("scaling", "run", str(path), "--executor", "submitit-local", "--no-report")
    [launch] = launches(tmp / "lost", "5e8-d16l1h2-s0")
    assert rc == 1 and f"5e8-d16l1h2-s0: FAILED (job {launch['job_id']}: FileNotFoundError: " in out
    assert launch["returncode"] is None and launch["wall_s"] is None
    assert launch["error"].endswith(f"see {tmp / 'lost' / 'logs' / 'submitit' / launch['job_id']}_0_log.err")
    err = (tmp / "lost" / "logs" / "submitit" / f"{launch['job_id']}_0_log.err").read_text()
    assert "No such file or directory" in err


@needs_submitit
def test_slurm_executor_gets_the_requested_parameters(tmp_path, monkeypatch):
    """Built, not submitted: a fake `srun` on the PATH is all submitit checks for."""
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    ns = build_parser().parse_args(["run", "sweep.toml", "--executor", "slurm", "--slurm-partition", "dev",
                                    "--slurm-time", "90", "--slurm-cpus", "4", "--slurm-gpus", "1",
                                    "--slurm", "qos=high", "--slurm", "mem=32GB", "--slurm", "exclusive=true"])
    executor = make_executor(ns, SimpleNamespace(out_dir=tmp_path / "out"))
    assert executor.name == "slurm" and executor.workers is None and executor.threads() == 4
    slurm = executor.executor._executor
    assert slurm.folder == (tmp_path / "out" / "logs" / "submitit").absolute()
    assert {k: slurm.parameters[k] for k in ("partition", "time", "cpus_per_task", "gpus_per_node", "qos", "mem",
                                              "exclusive")} == {
        "partition": "dev", "time": 90, "cpus_per_task": 4, "gpus_per_node": 1, "qos": "high", "mem": "32GB",
        "exclusive": True}
    sbatch = slurm._make_submission_file_text("true", "uid")
    for line in ("--partition=dev", "--time=90", "--cpus-per-task=4", "--gpus-per-node=1", "--qos=high",
                 "--mem=32GB", "--exclusive"):
        assert f"#SBATCH {line}\n" in sbatch


@needs_submitit
@pytest.mark.parametrize("argv, needle", [
    (["--executor", "slurm"], 'Could not detect "srun"'),
    (["--executor", "submitit-local", "--slurm", "qoss=high"], "Unknown argument 'qoss' for executor 'slurm'"),
    (["--executor", "slurm", "--slurm", "qos"], "--slurm: expected KEY=VALUE, got 'qos'"),
    (["--executor", "slurm", "--slurm-cpus", "0"], "--slurm-cpus: expected at least 1, got 0"),
], ids=["no-srun", "unknown-key", "no-value", "no-cpus"])
def test_bad_executor_options_are_one_line_and_start_nothing(argv, needle, setup, monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG", raising=False)
    monkeypatch.setenv("PATH", str(setup[0] / "no-such-bin"))  # no srun, even on a Slurm machine
    tmp, base = setup
    path = write_sweep(tmp / "bad.toml", base, tmp / "bad", **SMALL)
    rc, out, err = cli("scaling", "run", str(path), *argv)
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp / "bad" / "runs").exists() and not list((tmp / "bad").glob("logs/*.json"))


def test_missing_submitit_is_a_one_line_error(setup, monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG", raising=False)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    tmp, base = setup
    path = write_sweep(tmp / "missing.toml", base, tmp / "missing", **SMALL)
    rc, out, err = cli("scaling", "run", str(path), "--executor", "slurm")
    assert rc == 2 and err.count("\n") == 1
    assert "submitit is not installed; pip install 'llamalab[slurm]'" in err
    assert not (tmp / "missing" / "logs").exists()
