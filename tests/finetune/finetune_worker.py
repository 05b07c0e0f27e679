"""torchrun entry: ``finetune_worker.py RESULT_JSON OVERRIDES_JSON`` runs one fine-tuning (``FinetuneTask``)
and writes rank 0's losses and validation loss; OVERRIDES_JSON a list of override lists runs them one after the
other in one process group and writes a list of results."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from llamalab.config import load_config
from llamalab.finetune.task import FinetuneTask
from llamalab.train.trainer import train


def run(overrides: list[str]) -> dict:
    cfg = load_config(None, overrides)
    result = train(cfg, task=FinetuneTask(cfg))
    return {"losses": result.losses, "val_loss": result.val_loss,
            "final_dir": str(result.final_dir) if result.final_dir else None}


def main() -> None:
    torch.set_num_threads(1)
    runs = json.loads(sys.argv[2])
    results = [run(o) for o in runs] if runs and isinstance(runs[0], list) else run(runs)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
