"""Full fine-tuning under tensor and pipeline parallelism with masked targets (the prompts' targets are -100).

The loss of a step is the mean over the global batch's response tokens, whatever the layout: the summed
cross-entropy over every target that takes loss, divided by how many there are in the whole step. Rows hold
different numbers of response tokens here, so a layout that averages per-micro-batch means (gradient
accumulation, pipeline micro-batches) or mishandles -100 in the vocabulary-parallel loss gives other numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from finetune_helpers import finetune_overrides, varied_records

from llamalab.checkpoint import load_model
from llamalab.config import load_config
from llamalab.finetune.data import IGNORE_INDEX, InstructionLoader, load_instructions
from llamalab.finetune.task import FinetuneTask
from llamalab.tokenizer import Tokenizer
from llamalab.train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 5


def overrides(base, data, out_dir, *extra: str) -> list[str]:
    """Full fine-tuning, 5 steps of 4 rows (256 slots of 64), all 7 held-out examples validated at the end (a
    count no micro-batch here but 1 divides: the last batch is padded with rows that take no loss)."""
    return finetune_overrides(base, data, out_dir, "full") + [
        "--length.steps", str(STEPS), "--checkpoint.every", "0", "--data.val_batches", "8", *extra]


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("varied") / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in varied_records(44)))  # 34 train, 7 held out
    return path


@pytest.fixture(scope="module")
def runs(base, varied_file, tmp_path_factory):
    """One process with the global batch as one micro-batch (the reference) and with 4 accumulated micro-batches
    of 1 row, here; then TP=2 (2 accumulated micro-batches of 2 rows) and a 2-stage 1F1B pipeline (2 accumulated
    micro-batches of 2 rows, each split into 2 pipeline micro-batches of 1 row; the last validation batch's second
    row is padding, a pipeline micro-batch with no target) in one 2-process torchrun."""
    tmp = tmp_path_factory.mktemp("full_tp_pp")
    results = {}
    for name, micro in (("single", "4"), ("accum", "1")):
        cfg = load_config(None, overrides(base, varied_file, tmp / name, "--batch.micro_batch", micro))
        result = train(cfg, task=FinetuneTask(cfg))
        results[name] = {"losses": result.losses, "val_loss": result.val_loss, "final_dir": str(result.final_dir)}
    layouts = [overrides(base, varied_file, tmp / "tp", "--parallel.tp", "2"),
               overrides(base, varied_file, tmp / "pp", "--parallel.pp", "2", "--parallel.pp_microbatches", "2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "finetune_worker.py"), str(tmp / "results.json"), json.dumps(layouts)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results["tp"], results["pp"] = json.loads((tmp / "results.json").read_text())
    return results


def test_data_gives_micro_batches_different_response_counts(base, varied_file):
    """The premise: the rows of a step take loss on different numbers of tokens."""
    data = load_instructions(varied_file, Tokenizer(base / "tokenizer.model"), fmt="alpaca", seq_len=64,
                             validation_fraction=0.2)
    assert (len(data.train), len(data.validation)) == (34, 7)
    loader = InstructionLoader(data.train, batch_size=1, seq_len=64, pad_id=0, seed=0)
    counts = [[int((next(loader)[1] != IGNORE_INDEX).sum()) for _ in range(4)] for _ in range(STEPS)]
    assert all(len(set(step)) > 1 for step in counts), counts
    assert len({int((e.pair()[1] != IGNORE_INDEX).sum()) for e in data.validation[:4]}) > 1


def test_one_process_loss_is_the_mean_over_response_tokens(base, varied_file, runs):
    """Step 1's loss is the base model's cross-entropy summed over the first global batch's response tokens,
    divided by their number (not a mean of per-row or per-micro-batch means)."""
    data = load_instructions(varied_file, Tokenizer(base / "tokenizer.model"), fmt="alpaca", seq_len=64,
                             validation_fraction=0.2)
    inputs, targets = next(InstructionLoader(data.train, batch_size=4, seq_len=64, pad_id=0, seed=0))
    model, _, _ = load_model(base, dtype=torch.float32)
    with torch.no_grad():
        logits = model(inputs).float()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    expected = (total / (targets != IGNORE_INDEX).sum()).item()
    assert runs["single"]["losses"][0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("layout", ["accum", "tp", "pp"])
def test_full_finetune_layout_matches_one_process(runs, layout):
    """Per-step training losses, the validation loss and the final weights equal one process's."""
    single, run = runs["single"], runs[layout]
    assert len(run["losses"]) == STEPS
    assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert run["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    final, _, _ = load_model(run["final_dir"])
    reference, _, _ = load_model(single["final_dir"])
    for (name, a), (_, b) in zip(final.state_dict().items(), reference.state_dict().items(), strict=True):
        assert (a - b).abs().max() < 1e-4, name
