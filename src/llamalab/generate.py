"""Text generation with a preallocated key/value cache: one prefill, then one token per step.

The loop is gpt-fast's: every layer owns a static ``(batch, kv_heads, slots, head_dim)`` key and value
buffer, the prompt fills it in one forward pass, and each later step feeds one token per row, attending over
the filled part of the cache (``Decoder.window``). Shapes never change during a generation but for that
window's length, a dynamic dimension, so the single-token step is compiled once (``compile=True``:
torch.compile with inductor freezing on CPU, CUDA graphs on GPU) and replayed for every position.

Batches of prompts of different lengths are exact: each row keeps its own positions (row ``i`` writes its
token ``t`` into cache slot ``t``), the prompts are right-padded for the prefill, and a per-row mask lets a
row attend only to its own slots ``<= position``. Padding never enters a real token's attention, so a
prompt gives the same tokens in a batch as alone. Sampling draws one uniform number per row from a
per-row ``torch.Generator`` (seeded with ``seed``), so sampled tokens do not depend on the batch either.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .inference.cache_key import cache_key_pass, weights_digest
from .inference.fp32_products import fp32_products
from .inference.huge_pages import back_with_huge_pages, huge_pages_for_new_graphs
from .inference.quantize import Int8Linear, int8_linear
from .inference.row_gemm import row_kernels
from .model.llama import Attention, FeedForward

__all__ = ["ContextLengthError", "Decoder", "KVCache", "blocked_argmax", "generate", "generate_tokens", "kv_caches",
           "sample_next"]


class ContextLengthError(UserError, ValueError):
    """A prompt plus the tokens asked for does not fit in the model's context."""


class KVCache(nn.Module):
    """Static per-layer key/value buffers; ``update`` writes each row's new entries at that row's positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        """``k``, ``v``: zeroed (batch, kv_heads, slots, head_dim) buffers (``kv_caches`` makes them)."""
        super().__init__()
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``input_pos`` (batch, seq) positions; ``k``/``v`` (batch, kv_heads, seq, head_dim).

        Written as an indexed assignment (``index_put_``), which inductor updates in place; the equivalent
        ``scatter_`` made it copy the whole cache in and out on every step (decode 3x slower in attention).
        """
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, input_pos] = k.transpose(1, 2)  # advanced indices first: (batch, seq, heads, dim)
        self.v[rows, :, input_pos] = v.transpose(1, 2)
        return self.k, self.v


def kv_caches(n_layers: int, batch_size: int, n_kv_heads: int, cache_len: int, head_dim: int, dtype,
              device) -> list[KVCache]:
    """One KVCache per layer, all views of one zeroed block.

    Zeros, not empty: masked slots still enter the softmax-weighted sum with weight 0, and 0 * NaN = NaN. One block,
    so that on the CPU it can sit on 2 MiB pages (``back_with_huge_pages``; a layer's own buffer is often under
    2 MiB): every step reads the whole filled cache. Measured on ``small`` fp32 (12 layers, 320 slots, two
    threads): ``torch.sum`` over the caches 9.5 GB/s on 4 KiB pages, 16.3 on huge pages; the compiled step's
    attention kernel 192 -> 173 µs per layer (profiled, six alternated rounds, faster in each).
    """
    block = torch.zeros((n_layers, 2, batch_size, n_kv_heads, cache_len, head_dim), dtype=dtype, device=device)
    back_with_huge_pages([block])  # CPU only; elsewhere nothing happens
    return [KVCache(layer[0], layer[1]) for layer in block]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row from ``logits`` (batch, vocab): argmax when ``temperature`` is 0, else a draw.

    The draw inverts the cumulative distribution at ``uniform`` (one number in [0, 1) per row), restricted
    to the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    if top_p is not None and top_p < 1.0:
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    cdf = sorted_probs.cumsum(-1)
    threshold = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, threshold, right=True).clamp_(max=cdf.shape[-1] - 1)
    return order.gather(-1, choice).squeeze(-1)


class StackedLinear(nn.Module):
    """Bias-free linear layers that read the same input, run as one matrix product (outputs side by side).

    Only for a frozen compiled step: there the stacked weight is a constant, built once at compile time, so
    stacking q/k/v (and w1/w3) costs nothing per token and cuts 43 matrix calls per ``stories15m`` token to 25.
    Works for ``nn.Linear`` and ``Int8Linear`` parts; shares their tensors.
    """

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.sizes = [part.weight.shape[0] for part in parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([part.weight for part in self.parts])
        if isinstance(self.parts[0], Int8Linear):
            return int8_linear(x, weight, torch.cat([part.scales for part in self.parts]))
        return F.linear(x, weight)


class _StackedAttention(Attention):
    def project(self, x):
        return self.wqkv(x).split(self.wqkv.sizes, dim=-1)


class _StackedFeedForward(FeedForward):
    def project(self, x):
        return self.w13(x).split(self.w13.sizes, dim=-1)


def decode_view(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` for the compiled single-token step: q/k/v and w1/w3 stacked (no copy)."""
    clone = copy.copy(module)
    clone._modules = {name: None if child is None else decode_view(child) for name, child in module._modules.items()}
    stacked = {Attention: (_StackedAttention, "wqkv", ("wq", "wk", "wv")),
               FeedForward: (_StackedFeedForward, "w13", ("w1", "w3"))}.get(type(module))
    if stacked is not None:
        cls, name, parts = stacked
        clone.__class__ = cls
        clone._modules[name] = StackedLinear(*(module._modules[part] for part in parts))
    return clone


def blocked_argmax(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``logits.argmax(-1)`` for (batch, vocab), as the best of per-block maxima (same index, first on ties).

    Compiled for the CPU, a plain argmax over a 32000-word vocabulary is one serial loop (135 µs per token
    measured); the two-stage form vectorises and takes 35 µs.
    """
    if logits.shape[-1] % block:
        return logits.argmax(-1)
    values, within = logits.unflatten(-1, (-1, block)).max(-1)
    best = values.argmax(-1, keepdim=True)
    return (best * block + within.gather(-1, best)).squeeze(-1)


def _cache_len(need: int, max_seq_len: int) -> int:
    """Cache length for ``need`` positions: a multiple of 64 (few distinct compiled shapes), at most the context."""
    return min(max_seq_len, 64 * math.ceil(need / 64))


class Decoder:
    """Static caches for ``batch_size`` rows of ``cache_len`` positions, a prefill and a (compilable) step.

    Build it once and reuse it (``generate`` keeps one per shape on the model), so a compiled step is
    compiled once. ``compile=True`` compiles the single-token step; the prefill stays eager.
    """

    def __init__(self, model: nn.Module, batch_size: int, cache_len: int, *, compile: bool = False):
        args = model.args
        if cache_len > args.max_seq_len:
            raise ContextLengthError(f"cache length {cache_len} exceeds the model's max_seq_len={args.max_seq_len}")
        self.model, self.batch_size, self.cache_len = model, batch_size, cache_len
        self.dtype = model.tok_embeddings.weight.dtype
        self.device = model.tok_embeddings.weight.device
        self.step_model = decode_view(model) if compile and self.device.type == "cpu" else model
        # one spare slot, never written or attended: no window is then the whole buffer, whose slice would be
        # contiguous, a case the compiled step would specialise on (and recompile for the last window)
        self.caches = kv_caches(args.n_layers, batch_size, args.kv_heads, cache_len + 1, args.head_dim, self.dtype,
                                self.device)
        self.slots = torch.arange(cache_len, device=self.device)
        self._windows: dict[int, torch.Tensor] = {}
        self.compiled = compile
        self.weights_version = _weights_version(model) if compile else None  # the weights the step froze
        self._step = self._compile(self.step_logits) if compile else self.step_logits
        self._greedy_step = self._compile(self.greedy_step) if compile else self.greedy_step

    def _compile(self, fn):
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return _CompiledStep(torch.compile(fn, mode=mode, fullgraph=True, dynamic=False), self.device.type,
                             self.model)

    def reset(self) -> None:
        for cache in self.caches:
            cache.k.zero_()
            cache.v.zero_()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, model: nn.Module | None = None,
                slots: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens`` (batch, seq) at ``input_pos`` (batch, seq), reading and filling the caches.

        Attention covers the cache slots in ``slots`` (a prefix of ``self.slots``; all of them by default).
        ``logits_at`` (batch,) asks for the logits at one sequence index per row only (``Transformer.forward``).
        """
        slots = self.slots if slots is None else slots
        mask = (slots <= input_pos[:, :, None])[:, None]  # (batch, 1, seq, len(slots))
        return (self.model if model is None else model)(tokens, input_pos, self.caches, mask, logits_at)

    def step_logits(self, tokens: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One token per row: (batch, 1) tokens and positions, ``window(...)`` slots -> (batch, vocab) fp32 logits."""
        return self.forward(tokens, input_pos, self.step_model, slots)[:, -1].float()

    def greedy_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return blocked_argmax(self.step_logits(tokens, input_pos, slots))

    def window(self, last_pos: int) -> torch.Tensor:
        """The cache slots a step must attend over when no row is past ``last_pos``: the filled prefix, rounded up
        to a multiple of 64.

        Attention then costs what the rows have written, not the whole cache. The length is a dynamic dimension
        of the compiled step (one graph for every window, no recompiling as it grows)."""
        length = _cache_len(last_pos + 1, self.cache_len)
        if length not in self._windows:
            self._windows[length] = self.slots[:length]
            torch._dynamo.mark_dynamic(self._windows[length], 0)
        return self._windows[length]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the right-padded prompts through the model; (batch, vocab) logits at each row's last token.

        Eager, with bf16 and int8 weights multiplied in fp32 on a CPU without native bf16 (``fp32_products``):
        a 200-token prompt for ``small`` in bf16 took 2.07 s there, 0.44 s this way.
        """
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), -1)
        last = torch.as_tensor(lengths, device=self.device) - 1
        with fp32_products(self.model, tokens.numel()):
            return self.forward(tokens, pos, logits_at=last)[:, 0].float()

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
               eos_ids: Iterable[int] = ()) -> Iterator[list[int]]:
        """Yield the next token of every row, step by step, until all rows ended (EOS) or the budget is spent.

        Rows that already produced an EOS keep decoding (their tokens are to be ignored) so shapes stay fixed.
        """
        if len(prompts) != self.batch_size:
            raise ValueError(f"this Decoder holds {self.batch_size} rows, got {len(prompts)} prompts")
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if longest + max_new_tokens > self.cache_len:
            raise ContextLengthError(f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                                     f"exceeds the cache length {self.cache_len}")
        greedy = temperature <= 0
        generators = None if greedy else _generators(seed, len(prompts), self.device)
        eos = set(eos_ids)
        ended = [False] * len(prompts)
        with torch.inference_mode():
            self.reset()
            logits = self.prefill(prompts)
            pos = torch.as_tensor(lengths, device=self.device)[:, None]
        for t in range(max_new_tokens):
            with torch.inference_mode():  # entered per step: a suspended generator must not leak the mode
                if t == 0 or not greedy:
                    uniform = None if greedy else _uniform(generators, self.device)
                    nxt = sample_next(logits, temperature, top_k, top_p, uniform)
                out = nxt.tolist()
            yield out
            ended = [e or tok in eos for e, tok in zip(ended, out)]
            if all(ended) or t == max_new_tokens - 1:
                return
            with torch.inference_mode():
                slots = self.window(longest + t)
                if greedy:
                    nxt = self._greedy_step(nxt[:, None], pos, slots)
                else:
                    logits = self._step(nxt[:, None], pos, slots)
                pos = pos + 1


class _CompiledStep:
    """A compiled step whose first call (the one that compiles) runs under the compile settings.

    Inductor freezing (weights folded in as constants) is what makes a compiled CPU step pay; on CPU the
    matrix products are also autotuned against inductor's own C++ GEMM template, which at one row streams
    the weights far faster than MKL here (fp32 ``stories15m`` decode 8.1 -> 4.2 ms/token with the stacked
    projections and the in-place cache write). Every Decoder compiles the same function for its own caches and
    weights, so dynamo may keep more than its default 8 versions of it.

    The CPU step also uses inductor's C++ wrapper (``cpp_wrapper``): the ~50 kernel calls of a step are made
    from C++, not Python. With a model too small to cost anything (dim 48) a step fell from 0.73 to 0.41 ms;
    ``stories15m`` decode gained 3-5% (alternated in one process), for ~10 s more compile.

    On an AVX2 CPU, one-row products with bf16 or int8 weights, and batched ones with bf16 weights, use
    llamalab's own micro-kernels inside inductor's template (``llamalab.inference.row_gemm``): the stock
    ones read bf16 weights slower than fp32 ones.

    On Linux the step's constants (its frozen weights) are then moved onto 2 MiB pages
    (``llamalab.inference.huge_pages``): a step streams them all, and 4 KiB pages read ~10% slower here.

    Later calls skip the settings and dynamo's guard checks (``skip_guard_eval_unsafe``: only the checks
    that tell the Decoders' versions apart run): a Decoder's shapes never change but for the attention
    window, which the graph takes as a dynamic length and ``Decoder.window`` keeps within the cache; the full
    check cost ~0.3 ms per token.

    On CUDA the step is a CUDA graph whose output lives in the graph's own memory, overwritten by the next
    replay; the caller feeds one step's token into the next and may keep logits, so each output is cloned
    (a few bytes per row, or one row of logits) and each call starts a new graph step.

    Inductor's FX graph cache keys the compile on a digest of the model's weights
    (``llamalab.inference.cache_key``): it keys a frozen graph on the weights' shapes only, and would serve a
    model of the same shape the packed weights of another.
    """

    def __init__(self, fn, device_type: str, model: nn.Module):
        self.fn, self.device_type, self.model, self.warm = fn, device_type, model, False

    def __call__(self, *args):
        if self.device_type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
            return self._run(*args).clone()
        return self._run(*args)

    def _run(self, *args):
        if self.warm:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(*args)
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        settings = {"freezing": True,
                    "post_grad_custom_pre_pass": cache_key_pass("llamalab-weights-" + weights_digest(self.model))}
        kernels = pages = contextlib.nullcontext()
        if self.device_type == "cpu":
            settings.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", cpp_wrapper=True,
                            autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
            kernels, pages = row_kernels(), huge_pages_for_new_graphs()
        with inductor_config.patch(settings), kernels, pages, \
                dynamo_config.patch(recompile_limit=max(64, dynamo_config.recompile_limit)):
            out = self.fn(*args)
        self.warm = True
        return out


def _generators(seed, batch: int, device) -> list[torch.Generator]:
    seeds = [seed] * batch if seed is None or isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"seed: got {len(seeds)} seeds for {batch} prompts")
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        if s is None:
            g.seed()
        else:
            g.manual_seed(int(s))
        gens.append(g)
    return gens


def _uniform(generators: list[torch.Generator], device) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(device)


def get_decoder(model: nn.Module, batch_size: int, need: int, *, compile: bool = False) -> Decoder:
    """The model's Decoder for this shape, built on first use and kept on the model (compiled steps reused)."""
    args = model.args
    cache_len = _cache_len(need, args.max_seq_len)
    dtype = model.tok_embeddings.weight.dtype
    key = (batch_size, cache_len, dtype, model.tok_embeddings.weight.device, bool(compile))
    decoders = model.__dict__.setdefault("_llamalab_decoders", {})
    if key not in decoders or (compile and decoders[key].weights_version != _weights_version(model)):
        decoders[key] = Decoder(model, batch_size, cache_len, compile=compile)
    return decoders[key]


def _weights_version(model: nn.Module) -> tuple[int, ...] | None:
    """The in-place-write counters of the model's tensors: a compiled step holds frozen copies of the weights,
    so after training, ``load_state_dict`` or any in-place edit it must be rebuilt. None when not tracked
    (tensors made under ``torch.inference_mode``)."""
    try:
        return tuple(t._version for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:
        return None


def _check_lengths(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    max_seq_len = model.args.max_seq_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (the BOS token for unconditional text)")
        if len(p) + max_new_tokens > max_seq_len:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens and max_new_tokens is {max_new_tokens}: {len(p) + max_new_tokens} "
                f"positions exceed the model's max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens")
        vocab = model.args.vocab_size
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _token_stream(model, prompt_ids, max_new_tokens, *, temperature, top_k, top_p, seed, eos_ids, compile):
    prompt_ids = [[int(t) for t in p] for p in prompt_ids]
    _check_lengths(model, prompt_ids, max_new_tokens)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    need = max(len(p) for p in prompt_ids) + max_new_tokens
    decoder = get_decoder(model, len(prompt_ids), need, compile=compile)
    return decoder.stream(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, eos_ids=eos_ids)


def _eos_set(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, int):
        return () if eos_id < 0 else (eos_id,)
    return tuple(int(e) for e in eos_id if e >= 0)


def generate_tokens(model: nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | Sequence[int] | None = None, eos_id: int | Iterable[int] | None = None,
                    compile: bool = False) -> list[list[int]]:
    """New token ids for each prompt (lists of ids); no tokenizer needed.

    A row stops at the first token in ``eos_id`` (which is kept as its last token) or after
    ``max_new_tokens``. ``seed`` (an int, or one per prompt) makes sampling reproducible.
    """
    eos = _eos_set(eos_id)
    out: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    for step in _token_stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, eos_ids=eos, compile=compile):
        for i, tok in enumerate(step):
            if not ended[i]:
                out[i].append(tok)
                ended[i] = tok in eos
    return out


class _TextTracker:
    """Turns one row's growing token list into text: the continuation of the prompt, cut at a stop string."""

    def __init__(self, tokenizer, prompt: list[int], stop: Sequence[str]):
        self.tokenizer, self.prompt, self.stop = tokenizer, prompt, stop
        self.prompt_text = tokenizer.decode(prompt)
        self.tokens: list[int] = []
        self.stopped = False
        self.emitted = 0

    def text(self) -> str:
        # Decode with the prompt: SentencePiece drops the leading space of a text's first piece.
        full = self.tokenizer.decode(self.prompt + self.tokens)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text):]
        return self.tokenizer.decode(self.tokens)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.stop and not self.stopped:
            self.stopped = any(s in self.text() for s in self.stop)

    def final(self) -> str:
        text = self.text()
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def ready(self) -> str:
        """New text safe to emit: no half-decoded byte sequence, nothing that may turn into a stop string."""
        text = self.final() if self.stopped else self.text()
        if not self.stopped:
            end = len(text)
            while end > self.emitted and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
                end -= 1
            for s in self.stop:  # hold back a tail that could be the start of a stop string
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if text[end - k:end] == s[:k]:
                        end -= k
                        break
            text = text[:end]
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


def generate(model: nn.Module, tokenizer, prompts, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False, compile: bool = False,
             bos: bool = True):
    """Generate text continuing ``prompts`` (a str, a list of str, or token-id lists).

    Returns the new text (a str for a str prompt, else a list), or with ``stream=True`` (one prompt) an
    iterator of new text pieces that join to the same string. Each row stops at the tokenizer's EOS, at the
    first of the ``stop`` strings (which is cut off), or after ``max_new_tokens``. ``temperature`` 0 is
    greedy; ``top_k``/``top_p`` restrict sampling; ``seed`` (an int, or one per prompt) makes it repeatable.
    """
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer (this checkpoint has no tokenizer.model); "
                         "use generate_tokens for token ids")
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    batch = [prompts] if single else list(prompts)
    if not batch:
        return []
    prompt_ids = [tokenizer.encode(p, bos=bos) if isinstance(p, str) else [int(t) for t in p] for p in batch]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    eos = _eos_set(tokenizer.eos_id)
    steps = _token_stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, eos_ids=eos, compile=compile)
    trackers = [_TextTracker(tokenizer, p, stops) for p in prompt_ids]
    if stream:
        if len(batch) != 1:
            raise ValueError(f"stream=True takes one prompt, got {len(batch)}")
        return _stream_text(steps, trackers[0], eos)
    ended = [False] * len(batch)
    for step in steps:
        for i, tok in enumerate(step):
            if ended[i]:
                continue
            if tok in eos:
                ended[i] = True
                continue
            trackers[i].add(tok)
            ended[i] = trackers[i].stopped
        if all(ended):
            steps.close()
            break
    texts = [t.final() for t in trackers]
    return texts[0] if single else texts


def _stream_text(steps, tracker: _TextTracker, eos) -> Iterator[str]:
    try:
        for (tok,) in steps:
            if tok in eos:
                break
            tracker.add(tok)
            piece = tracker.ready()
            if piece:
                yield piece
            if tracker.stopped:
                break
        tracker.stopped = True  # flush what was held back
        piece = tracker.ready()
        if piece:
            yield piece
    finally:
        steps.close()
