"""``llamalab.train`` under torchrun: FSDP, TP and PP runs of the trainer match one process on the same global
batches, a checkpoint resumes across layouts, and the final native model is written from the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamalab.checkpoint import load_model
from llamalab.config import load_config
from llamalab.train.trainer import train

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import write_prepared  # noqa: E402

WORKER = Path(__file__).parent / "train_worker.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def overrides(prepared: Path, out_dir: Path, *extra: str) -> list[str]:
    """The tiny model on the tiny data: 4 AdamW steps of 256 tokens (2 accumulated micro-steps), fp32."""
    return ["--model.preset", "tiny", "--data.prepared", str(prepared), "--data.seq_len", "32",
            "--data.val_batches", "2", "--batch.global_tokens", "256", "--length.steps", "4",
            "--schedule.warmup_steps", "2", "--optimizer.lr", "3e-3", "--run.out_dir", str(out_dir),
            "--logging.every", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
            "--logging.plot", "false", "--logging.peak_tflops", "1", "--checkpoint.every", "2",
            "--precision.mode", "fp32", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process in this process; then, in one 2-process torchrun: FSDP=2, TP=2 resuming FSDP's step-2
    checkpoint, and a 2-stage GPipe pipeline. ``micro_batch x dp`` is 4 everywhere, so the global batches match."""
    tmp = tmp_path_factory.mktemp("trainer")
    prepared = write_prepared(tmp / "prepared")
    single = train(load_config(None, overrides(prepared, tmp / "single", "--batch.micro_batch", "4")))
    distributed = [
        overrides(prepared, tmp / "fsdp", "--batch.micro_batch", "2", "--parallel.dp_shard", "2"),
        overrides(prepared, tmp / "tp", "--batch.micro_batch", "4", "--parallel.tp", "2",
                  "--checkpoint.resume", str(tmp / "fsdp" / "checkpoints" / "step-00000002")),
        overrides(prepared, tmp / "pp", "--batch.micro_batch", "4", "--parallel.pp", "2",
                  "--parallel.pp_microbatches", "2", "--parallel.pp_schedule", "GPipe"),
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp / "results.json"), json.dumps(distributed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    fsdp, tp, pp = json.loads((tmp / "results.json").read_text())
    return {"single": {"losses": single.losses, "val_loss": single.val_loss, "final_dir": single.final_dir},
            "fsdp": fsdp, "tp": tp, "pp": pp, "tmp": tmp}


@pytest.mark.parametrize("layout", ["fsdp", "pp"])
def test_trainer_layout_matches_one_process(runs, layout):
    """Losses (AdamW, clipping, accumulation), validation loss and the final weights match one process."""
    single, run = runs["single"], runs[layout]
    assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert run["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    final, _, _ = load_model(run["final_dir"])
    reference, _, _ = load_model(single["final_dir"])
    for (name, a), (_, b) in zip(final.state_dict().items(), reference.state_dict().items(), strict=True):
        assert (a - b).abs().max() < 1e-4, name


def test_trainer_resumes_fsdp_checkpoint_under_tp(runs):
    """FSDP=2's step-2 checkpoint (model, AdamW state, loader position) continues under TP=2 like the
    uninterrupted run."""
    assert runs["tp"]["losses"] == pytest.approx(runs["single"]["losses"][2:], rel=1e-5)


def test_export_native_from_a_training_checkpoint(runs, tmp_path):
    """`llamalab convert` detects a sharded training checkpoint folder and exports the same weights as the
    run's own final model, with the shape read from its trainer_state.json."""
    from llamalab.cli import main

    out = tmp_path / "native"
    assert main(["convert", str(runs["tmp"] / "fsdp" / "checkpoints" / "step-00000004"), str(out), "--to", "native"]) == 0
    exported, _, _ = load_model(out)
    final, _, _ = load_model(runs["fsdp"]["final_dir"])
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items(), strict=True):
        assert a.equal(b), name
