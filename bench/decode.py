"""Batch-1 greedy decode speed: llamalab against transformers' ``generate`` and llama.cpp, on the same weights.

Every engine decodes the same random model (seeded): transformers gets the Hugging Face copy of the weights
(``meta_to_hf_state``), llama.cpp (``llama-cpp-python``) reads llamalab's own GGUF export. The variants run
round-robin, ``--repeats`` times each, and the table shows the median tokens/s and the ratio of each llamalab
variant to its peer measured in the same run:

    fp32 (compiled) vs llama.cpp f32 and transformers fp32
    bf16 (compiled) vs llama.cpp f16 and transformers bf16
    int8 weight-only (compiled, bf16 activations) vs llama.cpp q8_0

On the CPU it also measures the memory read bandwidth in the same rounds (``torch.sum`` over 512 MiB on huge
pages, as the compiled steps' weights are) and prints each llamalab variant's roofline: at batch 1 a token must
read every weight once (plus the filled cache), so bandwidth / bytes per token bounds any engine's tokens/s.
The table says how close each variant and each peer target (1x llama.cpp, 3x transformers) come to that
bound. A model whose weights nearly fit the last-level cache (``stories15m`` in bf16 or int8 here) is not held
to it.

A second table times the prefill of a longer prompt (``--prefill-tokens``, 200 by default): the time to the
first new token, every engine on the same prompt, alternated, with the same ratios.

Run:   .venv/bin/python bench/decode.py                 (stories15m and small, 256 new tokens, 2 threads)
Smoke: .venv/bin/python bench/decode.py --quick
Batch: .venv/bin/python bench/decode.py --batch-sizes 1,8,32   (llamalab tokens/s over all rows)
GPU:   python bench/decode.py --device cuda    (compiled steps replayed as CUDA graphs; llama.cpp not run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import torch  # noqa: E402

from llamalab.checkpoint import save_pretrained  # noqa: E402
from llamalab.generate import generate_tokens  # noqa: E402
from llamalab.inference.backend import accelerate  # noqa: E402
from llamalab.inference.backend.huge_pages import back_with_huge_pages  # noqa: E402
from llamalab.model import build_model  # noqa: E402
from llamalab.model.args import preset_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_TOKENIZER = Path(os.environ.get("LLAMALAB_SHARED_DATA", REPO.parent / "shared" / "data")) / \
    "tokenizers" / "llama" / "tokenizer.model"
PROMPT = [1, 450, 4996, 17354, 1701, 29916]  # BOS + a few ordinary ids, valid in any 32000 vocabulary
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Engine:
    """A named way to greedily decode ``n`` tokens after PROMPT; ``run`` returns the new token ids."""

    def __init__(self, name: str, peer_of: str | None = None):
        self.name, self.peer_of = name, peer_of

    def run(self, n: int) -> list[int]:
        raise NotImplementedError

    def first_token(self, prompt: list[int]) -> int:
        """Prefill ``prompt`` and return the greedy next token."""
        raise NotImplementedError


class Llamalab(Engine):
    def __init__(self, name, model, compile: bool, batch: int = 1):
        super().__init__(name)
        self.model, self.batch = model, batch
        self.backend = accelerate(model, compile=compile)

    def run(self, n):
        return generate_tokens(self.backend, [PROMPT] * self.batch, max_new_tokens=n)[0]

    def first_token(self, prompt):
        return generate_tokens(self.backend, [prompt], max_new_tokens=1)[0][0]


class Transformers(Engine):
    def __init__(self, name, model, dtype, device):
        import transformers

        from llamalab.convert.hf import hf_config, meta_to_hf_state

        super().__init__(name)
        cfg = {k: v for k, v in hf_config(model.args).items() if k != "architectures"}
        self.hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
        state = {k: v.float() for k, v in model.state_dict().items() if not k.startswith("rope_")}
        self.hf.load_state_dict(meta_to_hf_state(state, model.args), strict=True)
        self.hf.to(device=device, dtype=dtype)

    def run(self, n, prompt=PROMPT):
        ids = torch.tensor([prompt], device=self.hf.device)
        with torch.no_grad():
            out = self.hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                   pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt):].tolist()

    def first_token(self, prompt):
        return self.run(1, prompt)[0]


class LlamaCpp(Engine):
    def __init__(self, name, gguf_path: Path, threads: int, n_ctx: int):
        import llama_cpp
        import numpy as np

        super().__init__(name)
        self.np, self.llama_cpp = np, llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=n_ctx, n_batch=512, logits_all=False, verbose=False)  # 512: its default
        self.vocab = self.llm.n_vocab()

    def _next(self) -> int:
        return int(self.np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                              shape=(self.vocab,)).argmax())

    def run(self, n):
        self.llm.reset()
        self.llm.eval(PROMPT)
        out = []
        for _ in range(n):
            out.append(self._next())
            self.llm.eval([out[-1]])
        return out

    def first_token(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)
        return self._next()


def random_checkpoint(shape: str, folder: Path, positions: int, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """The preset with random weights; its context is widened when a run needs more than ``positions``."""
    args = preset_args(shape)
    if positions > args.max_seq_len:
        args = preset_args(shape, max_seq_len=64 * -(-positions // 64))
    model = build_model(args, seed=seed).eval()
    tokenizer = LLAMA_TOKENIZER if LLAMA_TOKENIZER.is_file() and args.vocab_size == 32000 else None
    path = save_pretrained(folder / shape, model, tokenizer_path=tokenizer)
    return model, path


def make_engines(shape: str, model, ckpt: Path, tmp: Path, wanted: set[str], threads: int, n_ctx: int,
                 device: torch.device):
    from llamalab.inference.quantize import quantize_int8

    engines = []

    def copy(dtype):
        m = build_model(model.args, device=device, init=False).eval()
        m.load_state_dict(model.state_dict())
        return m.to(dtype)

    if "llamalab" in wanted:
        engines += [Llamalab("llamalab fp32", copy(torch.float32), compile=True),
                    Llamalab("llamalab bf16", copy(torch.bfloat16), compile=True),
                    Llamalab("llamalab int8", quantize_int8(copy(torch.bfloat16)), compile=True)]
    if "transformers" in wanted:
        engines += [Transformers("transformers fp32", model, torch.float32, device),
                    Transformers("transformers bf16", model, torch.bfloat16, device)]
    if "llamacpp" in wanted and device.type != "cpu":
        print(f"[{shape}] llama.cpp skipped: llama-cpp-python here runs on the CPU only", file=sys.stderr)
    elif "llamacpp" in wanted:
        try:
            import llama_cpp  # noqa: F401

            from llamalab.convert.gguf import export_gguf
        except ImportError as exc:
            print(f"[{shape}] llama.cpp skipped: {exc}", file=sys.stderr)
        else:
            for kind in ("f32", "f16", "q8_0"):
                path = tmp / f"{shape}-{kind}.gguf"
                export_gguf(ckpt, path, dtype=kind)
                engines.append(LlamaCpp(f"llama.cpp {kind}", path, threads, n_ctx))
    return engines


PEERS = {  # llamalab variant -> the peers it is compared with
    "llamalab fp32": ["llama.cpp f32", "transformers fp32"],
    "llamalab bf16": ["llama.cpp f16", "transformers bf16"],
    "llamalab int8": ["llama.cpp q8_0", "transformers bf16"],
}


def read_bandwidth(mib: int = 512, repeats: int = 3) -> float:
    """Bytes per second this machine reads now: the best of a few ``torch.sum`` passes over ``mib`` MiB, on huge
    pages where the system offers them, as the compiled steps' weights are (4 KiB pages read ~10% slower here)."""
    x = torch.ones(mib * 2**20 // 4)
    back_with_huge_pages([x])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_token(model: torch.nn.Module, filled: float) -> float:
    """Bytes a batch-1 decode step reads: every weight but the embedding (one row is looked up) and the rotary
    tables, plus the keys and values of ``filled`` cache slots."""
    weights = sum(t.numel() * t.element_size()
                  for name, t in [*model.named_parameters(), *model.named_buffers()]
                  if not name.startswith(("tok_embeddings.", "rope_")))
    args, cache_item = model.args, model.tok_embeddings.weight.element_size()  # the cache has the embedding's dtype
    return weights + filled * args.n_layers * 2 * args.kv_heads * args.head_dim * cache_item


def print_roofline(engines, speed: dict[str, float], bandwidth: float, filled: float) -> None:
    print(f"roofline at {bandwidth / 1e9:.1f} GB/s read (median of the rounds):")
    print(f"{'engine':<20} {'MB/token':>9} {'bound tok/s':>12}  share of the bound: itself, then each peer target")
    for e in engines:
        if not isinstance(e, Llamalab):
            continue
        need = bytes_per_token(e.model, filled)
        bound = bandwidth / need
        targets = [f"{k}x {p} {k * speed[p] / bound:.0%}" for p, k in
                   ((p, 3 if p.startswith("transformers") else 1) for p in PEERS.get(e.name, [])) if p in speed]
        print(f"{e.name:<20} {need / 1e6:9.1f} {bound:12.1f}  {speed[e.name] / bound:.0%}; {', '.join(targets)}")


def alternated(engines, call, repeats: int, after_round=None) -> dict[str, list[float]]:
    """Seconds each ``call(engine)`` took, the engines taking turns ``repeats`` times so that load changes hit them
    all alike; ``after_round()`` runs after each round."""
    times: dict[str, list[float]] = {e.name: [] for e in engines}
    for _ in range(repeats):
        for e in engines:
            t = time.perf_counter()
            call(e)
            times[e.name].append(time.perf_counter() - t)
        if after_round is not None:
            after_round()
    return times


def bench_shape(shape: str, opts, tmp: Path) -> None:
    model, ckpt = random_checkpoint(shape, tmp, max(len(PROMPT) + opts.new_tokens, opts.prefill_tokens + 1))
    engines = make_engines(shape, model, ckpt, tmp, set(opts.engines.split(",")), opts.threads,
                           n_ctx=max(len(PROMPT) + opts.new_tokens, opts.prefill_tokens) + 8, device=opts.device)
    where = f"{opts.threads} threads" if opts.device.type == "cpu" else torch.cuda.get_device_name(opts.device)
    print(f"\n## {shape} (dim {model.args.dim}, {model.args.n_layers} layers, vocab {model.args.vocab_size}): "
          f"batch 1, greedy, {opts.new_tokens} new tokens, {where}, median of {opts.repeats}")
    for e in engines:  # warm-up: compiles, fills caches, and checks each engine decodes the requested length
        t = time.perf_counter()
        out = e.run(opts.new_tokens)
        assert len(out) == opts.new_tokens, (e.name, len(out))
        print(f"  warm-up {e.name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    bandwidths = []
    times = alternated(engines, lambda e: e.run(opts.new_tokens), opts.repeats,
                       after_round=(lambda: bandwidths.append(read_bandwidth())) if opts.device.type == "cpu" else None)
    speed = {name: opts.new_tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"{'engine':<20} {'tok/s':>8}  ratios")
    for name, tps in speed.items():
        ratios = [f"{tps / speed[p]:.2f}x {p}" for p in PEERS.get(name, []) if p in speed]
        print(f"{name:<20} {tps:8.1f}  {', '.join(ratios)}")
    if bandwidths:
        print_roofline(engines, speed, statistics.median(bandwidths), filled=len(PROMPT) + opts.new_tokens / 2)
    if opts.prefill_tokens:
        bench_prefill(engines, opts)


def long_prompt(n: int) -> list[int]:
    """BOS and ``n - 1`` ordinary ids, spread over a 32000 vocabulary."""
    return [1] + [100 + (7919 * i) % 31000 for i in range(n - 1)]


def bench_prefill(engines, opts) -> None:
    """Time to the first token after a ``--prefill-tokens`` prompt, alternated; ratios as in the decode table."""
    prompt = long_prompt(opts.prefill_tokens)
    for e in engines:
        e.first_token(prompt)  # warm-up (a new cache shape for llamalab)
    times = alternated(engines, lambda e: e.first_token(prompt), opts.repeats)
    print(f"prefill of a {len(prompt)}-token prompt (time to the first token), median of {opts.repeats}:")
    print(f"{'engine':<20} {'ms':>8} {'tok/s':>8}  ratios (speed)")
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    for name, t in ms.items():
        ratios = [f"{ms[p] / t:.2f}x {p}" for p in PEERS.get(name, []) if p in ms]
        print(f"{name:<20} {t:8.1f} {len(prompt) / t * 1e3:8.1f}  {', '.join(ratios)}")


def bench_batches(shape: str, opts, tmp: Path) -> None:
    model, _ = random_checkpoint(shape, tmp, len(PROMPT) + opts.new_tokens)
    sizes = [int(b) for b in opts.batch_sizes.split(",")]
    print(f"\n## {shape}: llamalab batched greedy decode, {opts.new_tokens} new tokens per row, median of {opts.repeats}")
    print(f"{'dtype':<6} {'batch':>5} {'tok/s (all rows)':>17}")
    for dtype in ("bf16", "fp32"):
        m = model.to(device=opts.device, dtype=DTYPES[dtype])
        engines = [Llamalab(f"b{b}", m, compile=True, batch=b) for b in sizes]
        for e in engines:
            e.run(opts.new_tokens)
        times = alternated(engines, lambda e: e.run(opts.new_tokens), opts.repeats)
        for b, e in zip(sizes, engines):
            print(f"{dtype:<6} {b:>5} {b * opts.new_tokens / statistics.median(times[e.name]):17.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="stories15m,small")
    p.add_argument("--engines", default="llamalab,transformers,llamacpp")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=200, help="prompt length of the prefill table (0: none)")
    p.add_argument("--batch-sizes", default=None, help="e.g. 1,8,32: llamalab batched throughput instead")
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: stories15m, 32 tokens, 2 repeats, a 64-token prefill")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.shapes, opts.new_tokens, opts.repeats, opts.prefill_tokens = "stories15m", 32, 2, 64
    torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in opts.shapes.split(","):
            if opts.batch_sizes:
                bench_batches(shape, opts, Path(tmp))
            else:
                bench_shape(shape, opts, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
