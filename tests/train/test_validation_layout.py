"""The validation loss does not depend on the parallel layout: every layout evaluates the same held-out windows
(``data.val_batches`` counts training global batches) and reports the token-weighted mean over exactly them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides, write_prepared

from llamalab.config import load_config
from llamalab.data.loader import ValidationSet
from llamalab.model import build_model
from llamalab.model.args import preset_args
from llamalab.parallel.mesh import ParallelDims
from llamalab.parallel.runtime import IGNORE_INDEX, ParallelRun, split_batch
from llamalab.train.trainer import cross_entropy_loss, train

WORKER = Path(__file__).parents[1] / "parallel" / "train_worker.py"
HELD_OUT = 2 * ((3_000 - 1) // 32)  # windows of the tiny data's two validation splits at seq_len 32: 186
GLOBAL_ROWS = 8  # tiny_overrides: 256 global tokens of seq_len 32
# (world_size, micro-batch) of one data-parallel group each; the global batch is GLOBAL_ROWS rows in all of them
LAYOUTS = [(1, 4), (1, 8), (1, 3), (2, 4), (2, 2), (2, 1), (4, 2), (4, 1)]


def rank_rows(prepared, val_batches, world_size, micro, rank):
    """(real rows as (seq_len + 1)-token tuples, number of batches, batch shapes) that ``rank`` evaluates."""
    val = ValidationSet(prepared, 32, micro, max_batches=val_batches, rank=rank, world_size=world_size,
                        batch_rows=GLOBAL_ROWS)
    rows, shapes = [], set()
    for batch in val.batches():
        inputs, targets = split_batch(batch)
        shapes.add(tuple(inputs.shape))
        real = (targets != IGNORE_INDEX).all(1)
        assert ((targets == IGNORE_INDEX).all(1) | real).all()  # a row is held out or padding, never half
        tokens = torch.cat([inputs, targets[:, -1:]], 1)
        rows += [tuple(r) for r in tokens[real].tolist()]
    return rows, len(val), shapes


@pytest.mark.parametrize("val_batches", [1, 2, 5, 30, None])
def test_every_layout_evaluates_the_same_windows(prepared, val_batches):
    """The union of the ranks' rows is the one-process set, row for row (30 batches ask for more than the
    186 held-out windows: all of them, with padding on some ranks)."""
    reference, _, _ = rank_rows(prepared, val_batches, 1, 8, 0)
    want = HELD_OUT if val_batches is None else min(HELD_OUT, val_batches * GLOBAL_ROWS)
    assert len(reference) == want and len(set(reference)) == want
    for world_size, micro in LAYOUTS:
        shares = [rank_rows(prepared, val_batches, world_size, micro, r) for r in range(world_size)]
        assert len({n for _, n, _ in shares}) == 1, (world_size, micro)  # every rank runs as many batches
        assert set().union(*(s for _, _, s in shares)) == {(micro, 32)}  # always full micro-batches
        union = [row for rows, _, _ in shares for row in rows]
        assert sorted(union) == sorted(reference), (world_size, micro)


def test_rank_shares_weighted_by_tokens_give_the_one_process_loss(prepared):
    """Summed losses and target counts over the ranks' batches, padded ones included, give one process's mean
    loss (the trainer adds exactly these over ranks)."""
    model = build_model(preset_args("tiny", vocab_size=256), seed=0)
    model.eval()
    run = ParallelRun.setup(model, ParallelDims(dp_shard=1), None, device=torch.device("cpu"),
                            loss_fn=cross_entropy_loss)

    def mean_loss(world_size, micro):
        total = count = 0
        for rank in range(world_size):
            val = ValidationSet(prepared, 32, micro, max_batches=None, rank=rank, world_size=world_size,
                                batch_rows=GLOBAL_ROWS)
            for batch in val.batches():
                t, c = run.eval_loss_sum(batch)
                total, count = total + t, count + c
        return total / count, count

    one, tokens = mean_loss(1, 8)
    assert tokens == HELD_OUT * 32
    for world_size, micro in [(2, 4), (4, 1), (2, 3)]:
        loss, n = mean_loss(world_size, micro)
        assert n == tokens and loss == pytest.approx(one, rel=1e-6), (world_size, micro)


@pytest.fixture(scope="module")
def books_only(tmp_path_factory):
    """The tiny data with "web" at proportion 0: every training row comes from "books", taken in order, so the
    training batches are the same whatever ``micro_batch * dp`` (validation still reads both sources)."""
    folder = write_prepared(tmp_path_factory.mktemp("books_only") / "prepared")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sources"]["web"]["proportion"] = 0.0
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_validation_loss_matches_one_process(books_only, tmp_path):
    """After the same 4 training steps, 2-process DDP (micro-batch 4: no accumulation, where one process
    accumulates 2 micro-batches of 4) and FSDP (micro-batch 2; 50 batches ask for more than the 186 held-out
    windows: all of them, 93 per rank, each rank's last batch padded) report one process's validation loss."""

    def overrides(out, val_batches, *extra):
        return tiny_overrides(books_only, tmp_path / out) + [
            "--length.steps", "4", "--checkpoint.every", "0", "--data.val_batches", val_batches, *extra]

    singles = [train(load_config(None, overrides(f"one-{v}", v))) for v in ("2", "50")]
    distributed = [overrides("ddp", "2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"),
                   overrides("fsdp", "50", "--parallel.dp_shard", "2", "--batch.micro_batch", "2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path / "results.json"), json.dumps(distributed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    print("val losses: one process", [s.val_loss for s in singles], "two processes",
          [r["val_loss"] for r in results])
    for single, run in zip(singles, results, strict=True):
        assert run["losses"] == pytest.approx(single.losses, rel=1e-5)  # the same training
        assert run["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    assert singles[0].val_loss != pytest.approx(singles[1].val_loss, rel=1e-4)  # 16 vs 186 windows differ
