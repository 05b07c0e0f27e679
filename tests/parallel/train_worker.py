"""torchrun entry: ``train_worker.py RESULT_JSON RUNS_JSON`` runs ``llamalab.train.trainer.train`` once per
entry of RUNS_JSON (a list of config override lists) in one process group, one after the other, and writes rank
0's losses per run; then tears the process group down cleanly (references dropped, gc, destroy)."""

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
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    results = []
    for overrides in runs:
        result = train(load_config(None, overrides))
        results.append({"losses": result.losses, "val_loss": result.val_loss,
                        "final_dir": str(result.final_dir) if result.final_dir else None})
        del result
        gc.collect()
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
