"""Fine-tuning memory and speed: LoRA against full fine-tuning on one shape (random weights).

Each method runs in its own worker process, so its peak RSS is its own; the parent alternates them, ``--rounds``
times ``--steps`` optimizer steps each, and reports trainable parameters, AdamW's state (bytes, after the first
step), peak RSS (``ru_maxrss``, the model included), median step time and tokens/s. A step is what
``llamalab finetune`` runs: forward, cross-entropy over the response half of each sequence (the prompt half's
targets are -100), backward, clipping at 1.0, AdamW.

Run:   .venv/bin/python bench/finetune.py                       (small, 2x512, LoRA rank 8 on wq wk wv wo)
Smoke: .venv/bin/python bench/finetune.py --shape tiny --seq 64 --rounds 2 --steps 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from llamalab.config import LoraConfig, OptimizerConfig
from llamalab.finetune.lora import apply_lora, trainable_parameters
from llamalab.model import build_model, preset_args
from llamalab.parallel.runtime import IGNORE_INDEX
from llamalab.train.optim import build_optimizer, clip_grad_norm
from llamalab.train.trainer import cross_entropy_loss


def worker(conn, method: str, opts) -> None:
    """Build the model and optimizer, then run ``steps`` timed steps per request until told to stop."""
    torch.set_num_threads(opts.threads)
    args = preset_args(opts.shape)
    model = build_model(args, seed=0)
    if method == "lora":
        lora = LoraConfig(rank=opts.rank, target_modules=opts.targets)
        apply_lora(model, lora.targets(), lora.rank, lora.alpha, lora.dropout)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[:, : opts.seq // 2] = IGNORE_INDEX  # the prompt half takes no loss
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.precision == "bf16")

    def step() -> None:
        with autocast:
            logits = model(inputs)
        cross_entropy_loss(logits, targets).backward()
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; AdamW's state exists from here on
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.ndim)
    trainable, total = trainable_parameters(model)
    conn.send((trainable, total, state_bytes))
    while conn.recv():
        start = time.perf_counter()
        for _ in range(opts.steps):
            step()
        conn.send((time.perf_counter() - start) / opts.steps)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed round")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="wq,wk,wv,wo")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    opts = parser.parse_args()

    ctx = mp.get_context("spawn")
    workers = {}
    for method in ("lora", "full"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, method, opts))
        proc.start()
        workers[method] = (proc, parent)
    facts = {m: conn.recv() for m, (_, conn) in workers.items()}
    times = {m: [] for m in workers}
    for i in range(opts.rounds):
        for method in ("lora", "full") if i % 2 == 0 else ("full", "lora"):
            workers[method][1].send(True)
            times[method].append(workers[method][1].recv())
    peak = {}
    for method, (proc, conn) in workers.items():
        conn.send(False)
        peak[method] = conn.recv()
        proc.join()

    tokens = opts.batch * opts.seq
    print(f"{opts.shape} {opts.batch}x{opts.seq}, {opts.precision}, {opts.threads} threads, LoRA rank {opts.rank} on "
          f"{opts.targets}; median of {opts.rounds} rounds of {opts.steps} steps, the methods alternated")
    print(f"{'method':<6} {'trainable':>12} {'of':>12} {'AdamW state':>12} {'peak RSS':>10} {'step s':>8} "
          f"{'tokens/s':>9}")
    for method in workers:
        trainable, total, state = facts[method]
        step = statistics.median(times[method])
        print(f"{method:<6} {trainable:>12,} {total:>12,} {state / 2**20:>9.2f} MiB {peak[method] / 2**20:>6.0f} MiB "
              f"{step:>8.2f} {tokens / step:>9.0f}")
    ratio = statistics.median(times["lora"]) / statistics.median(times["full"])
    print(f"LoRA step time / full: {ratio:.2f}")


if __name__ == "__main__":
    main()
