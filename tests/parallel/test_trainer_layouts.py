"""``llamalab.train`` under torchrun: FSDP, TP and PP runs of the trainer match one process on the same global
batches, checkpoints resume across layouts, and the final native model is written from the shards."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamalab.checkpoint import load_model

WORKER = Path(__file__).parent / "train_worker.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _write_prepared():
    spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).parents[1] / "train" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _write_prepared()(tmp_path_factory.mktemp("prepared"))


def run_train(nproc: int, out_dir: Path, prepared: Path, *overrides: str) -> dict:
    """Train the tiny model on the tiny data (4 AdamW steps, 256 tokens per step, fp32) under ``nproc`` ranks."""
    base = ["--model.preset", "tiny", "--data.prepared", str(prepared), "--data.seq_len", "32",
            "--data.val_batches", "2", "--batch.global_tokens", "256", "--length.steps", "4",
            "--schedule.warmup_steps", "2", "--optimizer.lr", "3e-3", "--run.out_dir", str(out_dir),
            "--logging.every", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
            "--logging.plot", "false", "--logging.peak_tflops", "1", "--checkpoint.every", "2",
            "--precision.mode", "fp32"]
    result = out_dir.parent / f"{out_dir.name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(result), *base, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    return run_train(1, tmp_path_factory.mktemp("single") / "run", prepared, "--batch.micro_batch", "4")


def test_fsdp_trainer_matches_one_process_and_resumes_under_tp(single, prepared, tmp_path):
    """FSDP=2 (2 sequences per rank) sees the same global batches as one process with 4; its step-2
    checkpoint resumes under TP=2 (4 sequences per rank, one data-parallel rank) with the same losses."""
    fsdp = run_train(2, tmp_path / "fsdp", prepared, "--batch.micro_batch", "2", "--parallel.dp_shard", "2")
    assert fsdp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert fsdp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    final, _, _ = load_model(fsdp["final_dir"])
    reference, _, _ = load_model(single["final_dir"])
    for (name, a), (_, b) in zip(final.state_dict().items(), reference.state_dict().items()):
        assert (a - b).abs().max() < 1e-4, name

    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    tp = run_train(2, tmp_path / "tp", prepared, "--batch.micro_batch", "4", "--parallel.tp", "2",
                   "--checkpoint.resume", str(ckpt))
    assert tp["losses"] == pytest.approx(single["losses"][2:], rel=1e-5)


def test_pipeline_trainer_matches_one_process(single, prepared, tmp_path):
    pp = run_train(2, tmp_path / "pp", prepared, "--batch.micro_batch", "4", "--parallel.pp", "2",
                   "--parallel.pp_microbatches", "2", "--parallel.pp_schedule", "GPipe")
    assert pp["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert pp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
