"""Training throughput: llamalab against transformers' ``LlamaForCausalLM``, plus a bf16 matmul peak probe.

Both models get the same shape, batch, loss (next-token cross-entropy in fp32), AdamW (the paper's betas and
decay, foreach), bf16 autocast over fp32 weights (``--precision``; ``auto`` falls back to fp32 on a CPU whose
bf16 matmuls are slower than fp32, i.e. without AVX-512 BF16 / AMX) and ``torch.compile``; they run in alternation, ``--rounds``
times ``--steps`` optimizer steps each, and the table shows median tokens/s, MFU against the peak measured in the
same run (6·N + 12·layers·dim·seq FLOPs per token) and llamalab's ratio to transformers. A second table shows the
activation memory per micro-batch that activation checkpointing keeps (none / selective / full) and its cost in
step time.

Run:   .venv/bin/python bench/train.py                     (stories15m 8x256 and small 4x1024)
Smoke: .venv/bin/python bench/train.py --quick
GPU:   python bench/train.py --device cuda --shapes small --batch-size 16   (a batch that fills more of the GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import torch  # noqa: E402

from llamalab.config import OptimizerConfig  # noqa: E402
from llamalab.hardware import measure_peak_flops  # noqa: E402
from llamalab.model import build_model, preset_args  # noqa: E402
from llamalab.parallel.activation_checkpoint import apply_activation_checkpointing  # noqa: E402
from llamalab.train.metrics import activation_bytes, training_flops_per_token  # noqa: E402
from llamalab.train.optim import build_optimizer, clip_grad_norm  # noqa: E402
from llamalab.train.trainer import cross_entropy_loss  # noqa: E402

SHAPES = {"stories15m": (8, 256), "small": (4, 1024)}  # (batch, seq) per shape


def hf_model(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamalab.convert.hf import hf_config

    cfg = hf_config(args)
    cfg.pop("architectures")
    cfg.pop("torch_dtype")
    config = LlamaConfig(**cfg, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Runner:
    """One model, its optimizer and a compiled training step on a fixed random batch."""

    def __init__(self, name: str, model, forward, batch: torch.Tensor, compile: bool, bf16: bool):
        self.name, self.model, self.batch, self.bf16 = name, model.to(batch.device), batch, bf16
        self.sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
        if compile:
            model.compile()
        self.forward = forward
        self.loss = torch.compile(cross_entropy_loss) if compile else cross_entropy_loss
        self.optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
        self.times: list[float] = []

    def step(self) -> None:
        with torch.autocast(self.batch.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(self.model, self.batch[:, :-1])
        loss = self.loss(logits, self.batch[:, 1:])
        loss.backward()
        clip_grad_norm(self.model, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed / steps)
        return elapsed


def random_batch(vocab_size: int, batch_size: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch_size, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)


def bench_shape(name: str, batch_size: int, seq: int, rounds: int, steps: int, compile: bool, bf16: bool,
                peak: float, device: torch.device) -> list:
    args = preset_args(name)
    batch = random_batch(args.vocab_size, batch_size, seq, device)
    runners = [
        Runner("llamalab", build_model(args, seed=0), lambda m, x: m(x), batch, compile, bf16),
        Runner("transformers", hf_model(args, 0), lambda m, x: m(input_ids=x).logits, batch, compile, bf16),
    ]
    for r in runners:  # compile and warm up outside the timed rounds
        start = time.perf_counter()
        r.step()
        r.step()
        r.sync()
        print(f"  {name} {r.name}: warm-up (compile) {time.perf_counter() - start:.1f} s", flush=True)
    for i in range(rounds):
        for r in runners if i % 2 == 0 else reversed(runners):
            r.timed(steps)
    flops = training_flops_per_token(args, seq)
    rows = []
    tokens = batch_size * seq
    for r in runners:
        tok_s = tokens / statistics.median(r.times)
        rows.append((name, r.name, tok_s, tok_s * flops / peak))
    return rows


def bench_activation_memory(name: str, batch_size: int, seq: int, steps: int, bf16: bool,
                            device: torch.device) -> list:
    args = preset_args(name)
    batch = random_batch(args.vocab_size, batch_size, seq, device)
    rows = []
    for mode in ("none", "selective", "full"):
        model = build_model(args, seed=0).to(device)
        apply_activation_checkpointing(model, mode)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            held = activation_bytes(lambda m=model: m(batch[:, :-1]))
        runner = Runner(mode, model, lambda m, x: m(x), batch, compile=False, bf16=bf16)
        runner.step()
        runner.timed(steps)
        rows.append((mode, held, runner.times[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="stories15m,small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="bf16 autocast or fp32; auto = bf16 when the probe shows bf16 matmuls faster")
    parser.add_argument("--quick", action="store_true", help="smoke run: stories15m at batch 2x64, no compile")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step for every shape "
                        "(default: stories15m 8, small 4)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    shapes = {n: (opts.batch_size or SHAPES[n][0], SHAPES[n][1]) for n in opts.shapes.split(",")}
    compile = not opts.no_compile
    if opts.quick:
        shapes, opts.rounds, opts.steps, compile = {"stories15m": (2, 64)}, 2, 1, False

    bf16_peak = max(measure_peak_flops(torch.bfloat16, opts.device, seconds=1.0) for _ in range(2))
    fp32_peak = max(measure_peak_flops(torch.float32, opts.device, seconds=1.0) for _ in range(2))
    bf16 = opts.precision == "bf16" or (opts.precision == "auto" and bf16_peak > 1.2 * fp32_peak)
    peak = bf16_peak if bf16 else fp32_peak
    where = torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else \
        f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; matmul probe: "
          f"bf16 {bf16_peak / 1e9:.1f} GFLOP/s, fp32 {fp32_peak / 1e9:.1f} GFLOP/s; training in "
          f"{'bf16 autocast' if bf16 else 'fp32'}", flush=True)

    results = []
    for name, (b, s) in shapes.items():
        results += bench_shape(name, b, s, opts.rounds, opts.steps, compile, bf16, peak, opts.device)
    print(f"\ntraining, {'bf16 autocast' if bf16 else 'fp32'}{' + torch.compile' if compile else ''}, AdamW, "
          f"median of {opts.rounds} rounds; MFU against the {'bf16' if bf16 else 'fp32'} matmul probe")
    print(f"{'shape':<11} {'batch':>8} {'impl':<13} {'tokens/s':>9} {'MFU':>6} {'vs HF':>6}")
    for name, impl, tok_s, mfu in results:
        hf = next(t for n, i, t, _ in results if n == name and i == "transformers")
        b, s = shapes[name]
        print(f"{name:<11} {f'{b}x{s}':>8} {impl:<13} {tok_s:>9.0f} {100 * mfu:>5.1f}% {tok_s / hf:>5.2f}x")

    name = next(iter(shapes))
    b, s = shapes[name]
    print(f"\nactivation checkpointing, {name} {b}x{s}, {'bf16 autocast' if bf16 else 'fp32'}, eager: "
          "activations kept per micro-batch")
    rows = bench_activation_memory(name, b, s, opts.steps, bf16, opts.device)
    base_mem, base_t = rows[0][1], rows[0][2]
    print(f"{'mode':<10} {'MiB':>8} {'saved':>6} {'step s':>7} {'time':>6}")
    for mode, held, t in rows:
        print(f"{mode:<10} {held / 2**20:>8.1f} {100 * (1 - held / base_mem):>5.0f}% {t:>7.3f} {t / base_t:>5.2f}x")


if __name__ == "__main__":
    main()
