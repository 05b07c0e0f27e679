"""``kill -9`` at random points of a real ``llamalab train`` process, mid-checkpoint included, then resume:
the weights and every step's loss equal an uninterrupted run's, bit for bit, and nothing is left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_overrides

from llamalab.config import load_config
from llamalab.train.metrics import read_metrics
from llamalab.train.trainer import train

STEPS = ["--length.steps", "16", "--checkpoint.every", "2", "--checkpoint.keep", "2",
         "--checkpoint.save_final", "true", "--data.val_batches", "1", "--logging.val_every", "5"]


def _start(config: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the in-process run (conftest)
    return subprocess.Popen([sys.executable, "-m", "llamalab", "train", str(config), *overrides,
                             "--resume", "auto"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.communicate(timeout=timeout)
    return False


def _train_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for line in path.read_bytes().splitlines() if b'"train"' in line) if path.is_file() else 0


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(prepared, tmp_path):
    config = tmp_path / "empty.toml"
    config.write_text("")
    straight = train(load_config(None, tiny_overrides(prepared, tmp_path / "straight") + STEPS))
    assert straight.steps == 16

    run = tmp_path / "killed"
    overrides = tiny_overrides(prepared, run) + STEPS
    ckpts = run / "checkpoints"
    rng = random.Random(0)
    mid_step = lambda: _train_steps(run) >= goal  # noqa: E731
    kills = [
        ("mid-checkpoint", lambda: any(ckpts.glob(".tmp-step-*"))),
        ("mid-step", mid_step),
        ("mid-checkpoint", lambda: any(ckpts.glob(".tmp-step-*"))),
        ("mid-step", mid_step),
        ("writing final/", lambda: any(run.glob(".final.tmp-*"))),
    ]
    landed = []
    for where, ready in kills:
        goal = _train_steps(run) + rng.randint(1, 4)
        if _kill_when(_start(config, overrides), ready):
            landed.append(where)
            if where == "mid-checkpoint":
                assert any(ckpts.glob(".tmp-step-*")), "the kill was meant to land inside a checkpoint write"
    assert landed.count("mid-checkpoint") >= 1 and "mid-step" in landed, landed

    proc = _start(config, overrides)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "trained 16 steps" in out.decode()

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
                if r["split"] == "train"}
    records = read_metrics(run / "metrics.jsonl")
    keys = [(r["split"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "a resumed run wrote a record twice"
    assert {r["step"]: r["loss"] for r in records if r["split"] == "train"} == expected
    assert not list(ckpts.glob(".tmp-step-*")) and not list(run.glob(".final.*")), "a killed write was left"
