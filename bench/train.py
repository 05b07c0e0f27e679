"""Training throughput: llamalab against transformers' ``LlamaForCausalLM``, plus a bf16 matmul peak probe.

Both models get the same shape, batch, loss (next-token cross-entropy in fp32), AdamW (the paper's betas and
decay, foreach), bf16 autocast over fp32 weights (``--precision``; ``auto`` falls back to fp32 on a CPU
without native bf16, i.e. without AVX-512 BF16 / AMX: ``hardware.fast_bf16``) and ``torch.compile``; they run in alternation, ``--rounds``
times ``--steps`` optimizer steps each, and the table shows median tokens/s, MFU against the peak measured in the
same run (6·N + 12·layers·dim·seq FLOPs per token) and llamalab's ratio to transformers. A second table shows the
activation memory per micro-batch that activation checkpointing keeps (``--modes``, default none / selective /
full; eager unless ``--ac-compile``) and its cost in step time, for each precision in ``--precision``: the modes
take turns (``--rounds`` rounds of ``--steps`` steps each, in alternating order), so a change in the machine's load
hits every mode alike; the table shows the median step time, the median of the per-round ratios to ``none``, the
ratio of the fastest rounds ("best": other processes only ever add time), the median per-round ratio of process
CPU time, and the activations kept by the whole model and by one block.

Run:   .venv/bin/python bench/train.py                     (stories15m 8x256 and small 4x1024)
Smoke: .venv/bin/python bench/train.py --quick
AC:    .venv/bin/python bench/train.py --ac-only --precision bf16,fp32 --rounds 10 --steps 1   (checkpointing only)
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
from llamalab.hardware import cpu_flags, fast_bf16, measure_peak_flops  # noqa: E402
from llamalab.model import build_model, preset_args  # noqa: E402
from llamalab.parallel.activation_checkpoint import MODES, apply_activation_checkpointing  # noqa: E402
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
        self.cpu_times: list[float] = []  # process CPU time (all threads) per step

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
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        self.sync()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed / steps)
        self.cpu_times.append((time.process_time() - cpu) / steps)
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


def bench_activation_checkpointing(name: str, batch_size: int, seq: int, modes: list[str], rounds: int, steps: int,
                                   bf16: bool, device: torch.device, compile: bool = False) -> list:
    """(mode, model activation bytes, one block's activation bytes, step times, per-round (wall, CPU) time ratios to
    the first mode).

    Activations are measured eagerly (``activation_bytes``: what the forward pass leaves alive for the backward
    pass, logits included). Every mode gets its own model (same seed), AdamW and batch; after two warm-up steps
    the modes take turns, ``rounds`` times ``steps`` steps each, in alternating order.
    """
    args = preset_args(name)
    batch = random_batch(args.vocab_size, batch_size, seq, device)

    def forward(fn, *inputs):  # leaves autocast before activation_bytes looks: its cache of weight casts is gone
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(*inputs)

    runners, held = [], {}
    for mode in modes:
        model = build_model(args, seed=0).to(device)
        apply_activation_checkpointing(model, mode)
        x = torch.randn(batch_size, seq, args.dim, device=device, requires_grad=True)
        held[mode] = (activation_bytes(lambda m=model: forward(m, batch[:, :-1])),
                      activation_bytes(lambda m=model, x=x: forward(m.layers["0"], x, m.rope_cos, m.rope_sin)))
        runners.append(Runner(mode, model, lambda m, x: m(x), batch, compile=compile, bf16=bf16))
    for r in runners:
        r.step()
        r.step()
        r.sync()
    ratios: dict[str, list[tuple[float, float]]] = {r.name: [] for r in runners}
    for i in range(rounds):
        for r in runners if i % 2 == 0 else reversed(runners):
            r.timed(steps)
        for r in runners:
            ratios[r.name].append((r.times[-1] / runners[0].times[-1], r.cpu_times[-1] / runners[0].cpu_times[-1]))
    return [(r.name, *held[r.name], r.times, ratios[r.name]) for r in runners]


def print_activation_checkpointing(name: str, batch_size: int, seq: int, opts, bf16: bool, compile: bool) -> None:
    args = preset_args(name)
    precision = "bf16 autocast" if bf16 else "fp32"
    logits = batch_size * seq * args.vocab_size * (2 if bf16 else 4)
    print(f"\nactivation checkpointing, {name} {batch_size}x{seq}, {precision}, "
          f"{'torch.compile' if compile else 'eager'}, AdamW; median of {opts.rounds} alternated rounds of "
          f"{opts.steps} steps; activations kept per micro-batch (eager; the logits alone are "
          f"{logits / 2**20:.1f} MiB), load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = bench_activation_checkpointing(name, batch_size, seq, opts.modes, opts.rounds, opts.steps, bf16,
                                          opts.device, compile)
    base_mem, base_block, base_best = rows[0][1], rows[0][2], min(rows[0][3])
    print(f"{'mode':<10} {'s/step':>7} {'vs none':>7} {'best':>6} {'CPU':>6} {'model MiB':>9} {'saved':>6} "
          f"{'block MiB':>9} {'saved':>6}")
    for mode, held, block, times, ratios in rows:
        print(f"{mode:<10} {statistics.median(times):>7.3f} {statistics.median(r[0] for r in ratios):>6.2f}x "
              f"{min(times) / base_best:>5.2f}x {statistics.median(r[1] for r in ratios):>5.2f}x "
              f"{held / 2**20:>9.1f} {100 * (1 - held / base_mem):>5.1f}% {block / 2**20:>9.2f} "
              f"{100 * (1 - block / base_block):>5.1f}%")
    print(f"(load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="stories15m,small",
                        help="comma-separated; the activation checkpointing table uses the first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--precision", default="auto",
                        help="bf16 (autocast), fp32 or auto (bf16 where the hardware has native bf16: hardware.fast_bf16); a "
                        "comma-separated list runs the checkpointing table for each, the throughput table for the "
                        "first")
    parser.add_argument("--modes", default="none,selective,full",
                        help="activation checkpointing modes to compare (none, the baseline, is always run)")
    parser.add_argument("--ac-only", action="store_true", help="only the activation checkpointing table")
    parser.add_argument("--ac-compile", action="store_true",
                        help="time the checkpointing modes under torch.compile (activations still measured eagerly)")
    parser.add_argument("--quick", action="store_true", help="smoke run: stories15m at batch 2x64, no compile")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step for every shape "
                        "(default: stories15m 8, small 4)")
    opts = parser.parse_args()
    precisions = opts.precision.split(",")
    if any(p not in ("auto", "bf16", "fp32") for p in precisions):
        parser.error(f"--precision: expected auto, bf16 or fp32 (comma-separated), got {opts.precision!r}")
    modes = [m for m in opts.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        parser.error(f"--modes: expected some of {MODES}, got {opts.modes!r}")
    opts.modes = ["none"] + [m for m in dict.fromkeys(modes) if m != "none"]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    shapes = {n: (opts.batch_size or SHAPES[n][0], SHAPES[n][1]) for n in opts.shapes.split(",")}
    compile = not opts.no_compile
    if opts.quick:
        shapes, opts.rounds, opts.steps, compile = {"stories15m": (2, 64)}, 2, 1, False

    bf16_peak = max(measure_peak_flops(torch.bfloat16, opts.device, seconds=1.0) for _ in range(2))
    fp32_peak = max(measure_peak_flops(torch.float32, opts.device, seconds=1.0) for _ in range(2))
    use_bf16 = [p == "bf16" or (p == "auto" and fast_bf16(opts.device)) for p in precisions]
    bf16 = use_bf16[0]
    peak = bf16_peak if bf16 else fp32_peak
    if opts.device.type == "cuda":
        where = torch.cuda.get_device_name(opts.device)
    else:
        flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in cpu_flags()]
        where = f"{torch.get_num_threads()} threads, CPU flags {' '.join(flags) or 'no AVX-512/AMX'}"
    print(f"torch {torch.__version__}, {where}; matmul probe: "
          f"bf16 {bf16_peak / 1e9:.1f} GFLOP/s, fp32 {fp32_peak / 1e9:.1f} GFLOP/s; training in "
          f"{'bf16 autocast' if bf16 else 'fp32'}", flush=True)

    if not opts.ac_only:
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
    for precision_bf16 in dict.fromkeys(use_bf16):
        print_activation_checkpointing(name, b, s, opts, precision_bf16, opts.ac_compile)


if __name__ == "__main__":
    main()
