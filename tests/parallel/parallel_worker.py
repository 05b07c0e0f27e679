"""torchrun entry for the parallel tests: ``parallel_worker.py OUT_DIR SCENARIOS_JSON``.

Runs each scenario (a ``run_layout`` keyword set under a name) in one process group and writes this rank's
results to ``OUT_DIR/rank{R}.pt`` (tensors only, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from parallel_harness import run_layout  # noqa: E402


def main() -> None:
    out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".cache/inductor"))
    dist.init_process_group("gloo")
    results = {}
    for name, kwargs in scenarios.items():
        results[name] = run_layout(**kwargs)
        dist.barrier()
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    del results
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
