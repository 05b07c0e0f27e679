"""torchrun entry: ``train_worker.py RESULT_JSON [config overrides...]`` runs ``llamalab.train.trainer.train``
under the launched layout and writes rank 0's losses; tears the process group down cleanly."""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist

from llamalab.config import load_config
from llamalab.train.trainer import train


def main() -> None:
    torch.set_num_threads(1)
    out, overrides = sys.argv[1], sys.argv[2:]
    result = train(load_config(None, overrides))
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump({"losses": result.losses, "val_loss": result.val_loss,
                       "final_dir": str(result.final_dir) if result.final_dir else None}, fh)
    del result
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
