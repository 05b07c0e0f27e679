"""Exact resume: N steps straight == N/2 steps, a crash, then --resume auto for the rest (losses and weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalab.train.metrics import read_metrics
from llamalab.train.trainer import train


class Killed(Exception):
    pass


def losses_by_step(out_dir) -> dict[int, float]:
    """The last recorded training loss of every step (a resumed run records the replayed steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["split"] == "train"}


def kill_at(step_to_die: int):
    def on_step(step, record):
        if step == step_to_die:
            raise Killed(f"simulated crash after step {step}")
    return on_step


@pytest.mark.slow
@pytest.mark.parametrize("precision, micro_batch, dropout", [("fp32", 4, 0.0), ("bf16", 2, 0.1)])
def test_resume_after_a_crash_is_exact(make_config, precision, micro_batch, dropout):
    # global batch 256 tokens of seq 32: micro-batch 4 -> 2 accumulation steps, micro-batch 2 -> 4; dropout's
    # masks come from the generator state the checkpoint saved
    common = ["--precision.mode", precision, "--batch.micro_batch", str(micro_batch), "--checkpoint.save_final", "true",
              "--model.dropout", str(dropout)]
    straight = make_config(*common, out="straight")
    result = train(straight)
    assert result.steps == 8 and result.skipped_steps == 0

    crashed = make_config(*common, out="crashed")
    with pytest.raises(Killed):
        train(crashed, on_step=kill_at(6))  # checkpoint at step 4, then dies during the next interval
    resumed = train(make_config(*common, "--checkpoint.resume", "auto", out="crashed"))
    assert resumed.steps == 8

    expected, got = losses_by_step(straight.run.out_dir), losses_by_step(crashed.run.out_dir)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # every step's loss, bit for bit (floats from JSON compare exactly)
    a = load_file(str(Path(straight.run.out_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(crashed.run.out_dir) / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert expected[8] < expected[1]  # and it did learn something
