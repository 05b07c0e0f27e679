"""LoRA fine-tuning under torchrun: FSDP over two ranks trains like one process (frozen base, sharded adapters,
the adapter export gathered from the checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import alpaca_records, finetune_overrides
from safetensors.torch import load_file

from llamalab.config import load_config
from llamalab.finetune.task import FinetuneTask
from llamalab.train.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory):
    """45 records, 5 held out: a count neither micro-batch x data-parallel ranks (2 x 1, 1 x 2) divides."""
    path = tmp_path_factory.mktemp("odd") / "alpaca45.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(45)))
    return path


def test_lora_under_fsdp_matches_one_process(base, odd_file, tmp_path):
    """The same losses, adapter and validation loss: both evaluate all 5 held-out examples (one process in 3
    batches of 2, the last padded; each rank its share of 3 and 2 in 3 batches of 1, the last of rank 1 all
    padding), where dropping incomplete global batches made the two ranks evaluate only 4."""
    common = ["--lora.dropout", "0", "--lora.target_modules", "wq,w2,output"]
    one = load_config(None, finetune_overrides(base, odd_file, tmp_path / "one") + common)
    single = train(one, task=FinetuneTask(one))
    fsdp = finetune_overrides(base, odd_file, tmp_path / "fsdp") + common + [
        "--batch.micro_batch", "1", "--parallel.dp_shard", "2"]  # the same global batches over two ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "finetune_worker.py"), str(tmp_path / "result.json"), json.dumps(fsdp)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["losses"] == pytest.approx(single.losses, rel=1e-5)
    print("val loss: one process", single.val_loss, "FSDP over two ranks", result["val_loss"])
    assert result["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
