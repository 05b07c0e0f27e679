"""Serving throughput and latency: ``llamalab serve`` against llama.cpp's OpenAI server on the same weights.

Both servers run as subprocesses on free loopback ports, with the same thread count: ``llamalab serve`` on a
native checkpoint with ``--slots`` = the highest concurrency, and ``python -m llama_cpp.server``
(``llama-cpp-python[server]``, optional) on llamalab's own GGUF export of that checkpoint at equal precision:

    --dtype fp32  ->  llama.cpp f32
    --dtype bf16  ->  llama.cpp f16   (2 bytes a weight each)
    --dtype int8  ->  llama.cpp q8_0  (llamalab: bf16 with int8 weight-only linears)

One client load generator (asyncio, the ``openai`` client, streamed ``/v1/completions``) drives both: at each
concurrency level, ``c`` workers each send ``--requests`` requests back to back, greedy, ``--max-tokens`` new
tokens, no stop strings. Every request's prompt differs from the others' in its first tokens (so llama.cpp's
prompt-prefix reuse does not help it) and all prompts have the same length. The servers take turns round by
round (the order flips each round) so that load changes hit them alike, after a warm-up each. Measured on the
received chunks:

    aggregate tok/s   generated tokens (``usage`` where the server streams it, else one per text chunk) over the
                      round's wall time, median over the rounds
    TTFT              request sent -> first text chunk, p50/p95 over all requests
    ITL               gap between successive text chunks, p50/p95 over all gaps

A request that ends early (EOS from the random weights) counts its actual tokens and is reported.

Beside the figures it prints the memory-bandwidth roofline, as bench/decode.py does: a decode step of ``c`` rows
reads every weight once plus each row's filled keys and values, so bandwidth / bytes per step bounds the steps
per second and ``c`` x that bounds the aggregate tokens/s (bandwidth: bench/decode.py's ``read_bandwidth``,
measured after every round; bytes: its ``bytes_per_token``).

llama-cpp-python's server decodes one request at a time (a lock around its one ``Llama``; no continuous
batching); it runs with ``--interrupt_requests False`` so that a new request queues instead of cutting the
running stream short, and every request sends ``repeat_penalty: 1.0`` (its default is 1.1; llamalab ignores the
field) so both decode plain greedy.

Run:   .venv/bin/python bench/serve.py                         (small, bf16, concurrency 1,4,16)
Smoke: .venv/bin/python bench/serve.py --shape stories15m --concurrency 1,4 --max-tokens 16 --rounds 1
Own weights: .venv/bin/python bench/serve.py --checkpoint runs/x/final [--gguf x-f16.gguf]
llama.cpp:   .venv/bin/pip install -e '.[llamacpp]'     (llama-cpp-python[server]; builds llama.cpp)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import REPO, bytes_per_token, random_checkpoint, read_bandwidth  # noqa: E402, I001  (first: it sets
# the inductor cache before torch is imported)

import torch  # noqa: E402

GGUF_KIND = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}
PROMPT_TEXT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
TARGETS = {1: 1.0, 16: 2.0}  # concurrency -> the aggregate tokens/s ratio llamalab should reach over llama.cpp
INSTALL_HINT = ("llama.cpp not run: llama-cpp-python is not installed. Install its server with\n"
                "    .venv/bin/pip install -e '.[llamacpp]'     (= 'llama-cpp-python[server]>=0.3'; builds llama.cpp)\n"
                "and run this again to compare; running llamalab alone.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One OpenAI-compatible server in a subprocess, its output in ``log``."""

    name: str
    command: list[str]
    port: int
    log: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env={**os.environ, **self.env}, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``/v1/models`` answers; raises with the log's tail when the process dies or times out."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Result:
    tokens: int
    ttft: float
    gaps: list[float]
    start: float
    end: float


async def one_request(client, model: str, prompt: str, max_tokens: int) -> Result:
    """Stream one completion; time the text chunks as they arrive."""
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"repeat_penalty": 1.0})
    arrivals, usage = [], None
    async for chunk in stream:
        now = time.perf_counter()
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(now)
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError(f"no text streamed for {prompt!r}")
    return Result(tokens=usage if usage is not None else len(arrivals), ttft=arrivals[0] - t0,
                  gaps=[b - a for a, b in zip(arrivals, arrivals[1:])], start=t0, end=end)


class Prompts:
    """Prompts of one token length whose first tokens differ: a five-digit request number, then PROMPT_TEXT."""

    def __init__(self):
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.count % 100000:05d}. {PROMPT_TEXT}"


async def run_load(server: Server, model: str, concurrency: int, requests: int, max_tokens: int,
                   prompts: Prompts) -> list[Result]:
    """``concurrency`` workers, each sending ``requests`` streamed requests back to back."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=3600) as client:
        async def worker():
            return [await one_request(client, model, prompts.next(), max_tokens) for _ in range(requests)]

        done = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for rs in done for r in rs]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


@dataclass
class Cell:
    """One server at one concurrency, over the rounds."""

    rates: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    short: int = 0  # requests that ended before max_tokens
    requests: int = 0

    def add(self, results: list[Result], max_tokens: int) -> None:
        wall = max(r.end for r in results) - min(r.start for r in results)
        self.rates.append(sum(r.tokens for r in results) / wall)
        self.ttft += [r.ttft for r in results]
        self.gaps += [g for r in results for g in r.gaps]
        self.short += sum(r.tokens < max_tokens for r in results)
        self.requests += len(results)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def make_checkpoint(opts, tmp: Path) -> Path:
    if opts.checkpoint:
        return Path(opts.checkpoint)
    positions = len(PROMPT_TEXT.split()) * 2 + 16 + opts.max_tokens  # a generous bound on prompt tokens
    _, path = random_checkpoint(opts.shape, tmp, positions)
    return path


def step_bytes(ckpt: Path, dtype: str) -> tuple[float, float, object]:
    """(bytes of the weights a decode step reads, bytes of keys and values per filled position and row, args)."""
    import llamalab

    pre = llamalab.load(ckpt, dtype="bf16" if dtype == "int8" else dtype)
    model = pre.model
    if dtype == "int8":
        from llamalab.inference.quantize import quantize_int8

        model = quantize_int8(model)
    weights = bytes_per_token(model, 0)
    per_position = bytes_per_token(model, 1) - weights
    return weights, per_position, pre


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="native checkpoint (default: random weights of --shape)")
    p.add_argument("--shape", default="small", help="preset of the random checkpoint (default: small, 134M)")
    p.add_argument("--gguf", default=None, help="llama.cpp's model (default: export the checkpoint at --dtype)")
    p.add_argument("--dtype", choices=sorted(GGUF_KIND), default="bf16",
                   help="llamalab's precision; llama.cpp gets the GGUF type of the same width (default: bf16/f16)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=2, help="requests each concurrent client sends per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each server (default: all)")
    p.add_argument("--compile", action="store_true", help="llamalab serve --compile")
    p.add_argument("--engines", default="llamalab,llamacpp")
    p.add_argument("--startup-timeout", type=float, default=1200)
    opts = p.parse_args(argv)
    levels = [int(c) for c in opts.concurrency.split(",")]
    engines = set(opts.engines.split(","))
    if "llamacpp" in engines:
        try:
            import llama_cpp  # noqa: F401
            import llama_cpp.server  # noqa: F401
        except ImportError:
            print(INSTALL_HINT, file=sys.stderr)
            engines.discard("llamacpp")
    torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {opts.threads} threads per server, load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = make_checkpoint(opts, tmp)
        weights, per_position, pre = step_bytes(ckpt, opts.dtype)
        args, tok = pre.args, pre.tokenizer
        del pre
        if tok is None:
            raise SystemExit(f"{ckpt}: no tokenizer.model; the servers need one")
        prompt_len = len(tok.encode(Prompts().next(), bos=True))
        context = min(args.max_seq_len, 64 * -(-(prompt_len + opts.max_tokens + 8) // 64))
        name = "bench"
        servers = []
        if "llamalab" in engines:
            cmd = [sys.executable, "-m", "llamalab", "serve", str(ckpt), "--port", str(free_port()),
                   "--slots", str(max(levels)), "--max-queue", str(max(levels) * opts.requests + 8),
                   "--context", str(context), "--model-name", name, "--log-level", "warning",
                   "--dtype", "bf16" if opts.dtype == "int8" else opts.dtype]
            cmd += ["--quantize", "int8"] if opts.dtype == "int8" else []
            cmd += ["--compile"] if opts.compile else []
            threads = {"OMP_NUM_THREADS": str(opts.threads), "MKL_NUM_THREADS": str(opts.threads)}
            servers.append(Server("llamalab", cmd, int(cmd[cmd.index("--port") + 1]), tmp / "llamalab.log", threads))
        if "llamacpp" in engines:
            gguf = Path(opts.gguf) if opts.gguf else tmp / f"model-{GGUF_KIND[opts.dtype]}.gguf"
            if not opts.gguf:
                from llamalab.convert.gguf import export_gguf

                export_gguf(ckpt, gguf, dtype=GGUF_KIND[opts.dtype])
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
                   "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
                   "--n_threads", str(opts.threads), "--n_threads_batch", str(opts.threads),
                   "--interrupt_requests", "False"]
            servers.append(Server(f"llama.cpp {GGUF_KIND[opts.dtype]}", cmd, port, tmp / "llamacpp.log"))

        what = "random " + opts.shape if not opts.checkpoint else str(ckpt)
        print(f"model: {what} (dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}), llamalab "
              f"{opts.dtype}{' compiled' if opts.compile else ''}; prompt {prompt_len} tokens, {opts.max_tokens} "
              f"new tokens, greedy, {opts.requests} requests per client per round, {opts.rounds} rounds")
        try:
            for s in servers:  # one at a time: start-up (a compile) does not overlap the other's
                s.start()
                print(f"  {s.name} ready in {s.wait_ready(opts.startup_timeout):.1f} s", file=sys.stderr)
            prompts = Prompts()
            for s in servers:  # warm-up: one full request, then a burst at the highest concurrency
                t = time.perf_counter()
                asyncio.run(run_load(s, name, 1, 1, opts.max_tokens, prompts))
                asyncio.run(run_load(s, name, max(levels), 1, 4, prompts))
                print(f"  warm-up {s.name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
            cells = {(s.name, c): Cell() for s in servers for c in levels}
            bandwidths = []
            for c in levels:
                for r in range(opts.rounds):
                    for s in servers if r % 2 == 0 else servers[::-1]:
                        results = asyncio.run(run_load(s, name, c, opts.requests, opts.max_tokens, prompts))
                        cells[s.name, c].add(results, opts.max_tokens)
                        print(f"  c={c} round {r + 1} {s.name}: {cells[s.name, c].rates[-1]:.1f} tok/s",
                              file=sys.stderr)
                    bandwidths.append(read_bandwidth())
        finally:
            for s in servers:
                s.stop()
    report(servers, cells, levels, statistics.median(bandwidths), weights, per_position,
           filled=prompt_len + opts.max_tokens / 2)
    return 0


def report(servers, cells, levels, bandwidth, weights, per_position, filled) -> None:
    ours = next((s.name for s in servers if s.name == "llamalab"), None)
    theirs = next((s.name for s in servers if s.name != "llamalab"), None)
    print(f"\n{'server':<15} {'conc':>4} {'tok/s':>8} {'TTFT p50':>9} {'p95':>8} {'ITL p50':>8} {'p95':>8} "
          f"{'ours/theirs':>11} {'bound tok/s':>11} {'of bound':>8}")
    for c in levels:
        step = weights + c * filled * per_position
        bound = c * bandwidth / step
        for s in servers:
            cell = cells[s.name, c]
            ratio = f"{cell.rate / cells[theirs, c].rate:.2f}x" if s.name == ours and theirs else ""
            print(f"{s.name:<15} {c:>4} {cell.rate:8.1f} {1e3 * percentile(cell.ttft, 50):7.0f}ms "
                  f"{1e3 * percentile(cell.ttft, 95):6.0f}ms {1e3 * percentile(cell.gaps, 50):6.1f}ms "
                  f"{1e3 * percentile(cell.gaps, 95):6.1f}ms {ratio:>11} {bound:11.1f} {cell.rate / bound:8.0%}")
    print(f"roofline: {bandwidth / 1e9:.1f} GB/s read (median of the rounds); a step reads {weights / 1e6:.1f} MB of "
          f"weights + {per_position / 1e3:.1f} kB of keys/values per filled position and row ({filled:.0f} filled "
          f"on average); bound = concurrency x bandwidth / bytes per step")
    short = [f"{s.name} c={c}: {cells[s.name, c].short}/{cells[s.name, c].requests}"
             for s in servers for c in levels if cells[s.name, c].short]
    if short:
        print("requests that ended before max_tokens (EOS; their actual tokens are counted): " + ", ".join(short))
    if ours and theirs:
        for c, target in TARGETS.items():
            if c in levels:
                ratio = cells[ours, c].rate / cells[theirs, c].rate
                print(f"target at concurrency {c}: >= {target:.1f}x {theirs}'s aggregate tok/s: {ratio:.2f}x "
                      f"({'met' if ratio >= target else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
