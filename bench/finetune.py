"""Fine-tuning memory and speed: LoRA (on an fp32 and on an int8 base) against full fine-tuning on one shape
(random weights).

Each method runs in its own worker process, so its peak RSS is its own; the parent rotates them, ``--rounds``
times ``--steps`` optimizer steps each, and reports trainable parameters, AdamW's state (bytes, after the first
step), the model's weights (parameters and buffers, int8 ones included), peak RSS (the model included; on Linux
the high-water mark is restarted once the model is built, so the int8 base's fp32 load before quantization does
not count; elsewhere ``ru_maxrss``), median step time and tokens/s. A step is what ``llamalab finetune`` runs:
forward, cross-entropy over the response half of each sequence (the prompt half's targets are -100), backward,
clipping at 1.0, AdamW. glibc keeps freed heap memory resident, so peak RSS also measures fragmentation;
``MALLOC_MMAP_THRESHOLD_=65536`` (inherited by the workers) makes it closer to the live tensors.

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
from llamalab.finetune.lora import apply_lora, quantize_base, trainable_parameters
from llamalab.model import build_model, preset_args
from llamalab.parallel.runtime import IGNORE_INDEX
from llamalab.train.optim import build_optimizer, clip_grad_norm
from llamalab.train.trainer import cross_entropy_loss

METHODS = ("lora", "lora-int8", "full")  # lora-int8: lora.base_dtype = "int8"


def reset_peak_rss() -> None:
    """Linux: restart the peak-RSS high-water mark at the current RSS (``/proc/self/clear_refs``, 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes: ``VmHWM`` where /proc has it, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(conn, method: str, opts) -> None:
    """Build the model and optimizer, then run ``steps`` timed steps per request until told to stop."""
    torch.set_num_threads(opts.threads)
    args = preset_args(opts.shape)
    model = build_model(args, seed=0)
    if method in ("lora", "lora-int8"):
        lora = LoraConfig(rank=opts.rank, target_modules=opts.targets)
        apply_lora(model, lora.targets(), lora.rank, lora.alpha, lora.dropout)
        if method == "lora-int8":
            quantize_base(model)  # every linear layer int8, as FinetuneTask does
    reset_peak_rss()
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
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    conn.send((trainable, total, state_bytes, weight_bytes))
    while conn.recv():
        start = time.perf_counter()
        for _ in range(opts.steps):
            step()
        conn.send((time.perf_counter() - start) / opts.steps)
    conn.send(peak_rss())


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
    parser.add_argument("--methods", default=",".join(METHODS), help=f"some of {','.join(METHODS)}")
    opts = parser.parse_args()
    methods = tuple(m.strip() for m in opts.methods.split(","))
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods: expected some of {','.join(METHODS)}, got {opts.methods!r}")

    ctx = mp.get_context("spawn")
    workers = {}
    for method in methods:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, method, opts))
        proc.start()
        workers[method] = (proc, parent)
    facts = {m: conn.recv() for m, (_, conn) in workers.items()}
    times = {m: [] for m in workers}
    for i in range(opts.rounds):
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:  # each goes first in turn
            workers[method][1].send(True)
            times[method].append(workers[method][1].recv())
    peak = {}
    for method, (proc, conn) in workers.items():
        conn.send(False)
        peak[method] = conn.recv()
        proc.join()

    tokens = opts.batch * opts.seq
    print(f"{opts.shape} {opts.batch}x{opts.seq}, {opts.precision}, {opts.threads} threads, LoRA rank {opts.rank} on "
          f"{opts.targets}; median of {opts.rounds} rounds of {opts.steps} steps, the methods rotated")
    print(f"{'method':<9} {'trainable':>12} {'of':>12} {'AdamW state':>12} {'weights':>10} {'peak RSS':>10} "
          f"{'step s':>8} {'tokens/s':>9}")
    for method in workers:
        trainable, total, state, weights = facts[method]
        step = statistics.median(times[method])
        print(f"{method:<9} {trainable:>12,} {total:>12,} {state / 2**20:>9.2f} MiB {weights / 2**20:>6.0f} MiB "
              f"{peak[method] / 2**20:>6.0f} MiB {step:>8.2f} {tokens / step:>9.0f}")
    for method in ("lora", "lora-int8"):
        if method in times and "full" in times:
            ratio = statistics.median(times[method]) / statistics.median(times["full"])
            print(f"{method} step time / full: {ratio:.2f}")


if __name__ == "__main__":
    main()
