"""torchrun entry: ``finetune_worker.py RESULT_JSON OVERRIDES_JSON`` runs one fine-tuning (``FinetuneTask``)
and writes rank 0's losses and validation loss."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from llamalab.config import load_config
from llamalab.finetune.task import FinetuneTask
from llamalab.train.trainer import train


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, json.loads(sys.argv[2]))
    result = train(cfg, task=FinetuneTask(cfg))
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump({"losses": result.losses, "val_loss": result.val_loss}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
