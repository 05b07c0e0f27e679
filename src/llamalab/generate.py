"""Text generation with a preallocated key/value cache: one prefill, then one token per step.

The loop is gpt-fast's: every layer owns a static ``(batch, kv_heads, slots, head_dim)`` key and value
buffer, the prompt fills it in one forward pass, and each later step feeds one token per row, attending over
the filled part of the cache (``Decoder.window``). Shapes never change during a generation but for that
window's length, a dynamic dimension, so the single-token step can be compiled once and replayed for every
position. How it runs on this machine (compiled or not, the CPU's product mode, huge pages) is the inference
backend's business, applied from outside: ``generate_tokens(accelerate(model, compile=True), ...)``
(``llamalab.inference.backend``).

Batches of prompts of different lengths are exact: each row keeps its own positions (row ``i`` writes its
token ``t`` into cache slot ``t``), the prompts are right-padded for the prefill, and a per-row mask lets a
row attend only to its own slots ``<= position``. Padding never enters a real token's attention, so a
prompt gives the same tokens in a batch as alone. Sampling draws one uniform number per row from a
per-row ``torch.Generator`` (seeded with ``seed``), so sampled tokens do not depend on the batch either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import UserError
from .inference.backend import Backend

__all__ = ["ContextLengthError", "Decoder", "KVCache", "TextTracker", "blocked_argmax", "draw_uniform", "generate",
           "generate_tokens", "make_generators", "sample_next"]


class ContextLengthError(UserError, ValueError):
    """A prompt plus the tokens asked for does not fit in the model's context."""


class KVCache(nn.Module):
    """Static per-layer key/value buffers; ``update`` writes each row's new entries at that row's positions."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        """``k``, ``v``: zeroed (batch, kv_heads, slots, head_dim) buffers (a Decoder's block)."""
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


def _backend(model: nn.Module | Backend) -> Backend:
    """``model``'s backend: a bare model decodes eagerly, with nothing kept beyond the call."""
    return model if isinstance(model, Backend) else Backend(model)


class Decoder:
    """Static caches for ``batch_size`` rows of ``cache_len`` positions, a prefill and a single-token step.

    ``model`` is a model (eager) or its backend (``llamalab.inference.backend.accelerate``), which runs the
    step as it was asked to (``step`` and ``greedy``: ``step_logits`` and ``greedy_step``, compiled or not) and
    keeps one Decoder per shape (``get_decoder``), so a compiled step is compiled once. The prefill stays eager.
    """

    def __init__(self, model: nn.Module | Backend, batch_size: int, cache_len: int):
        self.backend = _backend(model)
        self.model = self.backend.model
        args = self.model.args
        if cache_len > args.max_seq_len:
            raise ContextLengthError(f"cache length {cache_len} exceeds the model's max_seq_len={args.max_seq_len}")
        self.batch_size, self.cache_len, self.device = batch_size, cache_len, self.backend.device
        # All layers' keys and values are views of one zeroed block. Zeros, not empty: masked slots still enter
        # the softmax-weighted sum with weight 0, and 0 * NaN = NaN. One block, so that on the CPU it can sit on
        # 2 MiB pages (a layer's part is often under 2 MiB): every step reads the whole filled cache (``small``
        # fp32, 320 slots: ``torch.sum`` over it 9.5 GB/s on 4 KiB pages, 16.3 on huge pages). One spare
        # slot, never written or attended: no window is then the whole buffer, whose slice would be contiguous,
        # a case the compiled step would specialise on (and recompile for the last window).
        block = self.backend.zeros((args.n_layers, 2, batch_size, args.kv_heads, cache_len + 1, args.head_dim),
                                   self.model.tok_embeddings.weight.dtype)
        self.caches = [KVCache(layer[0], layer[1]) for layer in block]
        self.slots = torch.arange(cache_len, device=self.device)
        self._windows: dict[int, torch.Tensor] = {}
        self._row_caches: dict[int, list[KVCache]] = {}  # one row's views of the caches (``prefill_row``)
        self.step_model = self.backend.step_model()
        self.step = self.backend.compile_step(self.step_logits)
        self.greedy = self.backend.compile_step(self.greedy_step)

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
            self._windows[length] = self.backend.dynamic_length(self.slots[:length])
        return self._windows[length]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the right-padded prompts through the model; (batch, vocab) logits at each row's last token.

        Eager, under the backend's product mode: bf16 and int8 weights multiplied in fp32 on a CPU without native
        bf16 (a 200-token prompt for ``small`` in bf16 took 2.07 s there, 0.44 s this way).
        """
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        pos = torch.arange(width, device=self.device).expand(len(prompts), -1)
        last = torch.as_tensor(lengths, device=self.device) - 1
        with self.backend.products(tokens.numel()):
            return self.forward(tokens, pos, logits_at=last)[:, 0].float()

    @torch.inference_mode()
    def prefill_row(self, row: int, prompt: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Fill row ``row``'s cache with ``prompt`` alone, leaving the other rows as they are (a server's slot
        taking a new request while the others decode): (vocab,) fp32 logits at its last token, or with
        ``all_logits`` (len(prompt), vocab) at every token."""
        if row not in self._row_caches:
            self._row_caches[row] = [KVCache(c.k[row:row + 1], c.v[row:row + 1]) for c in self.caches]
        tokens = torch.as_tensor([list(prompt)], dtype=torch.long, device=self.device)
        pos = torch.arange(len(prompt), device=self.device)[None]
        mask = (self.slots <= pos[:, :, None])[:, None]
        last = None if all_logits else pos[:, -1]
        with self.backend.products(tokens.numel()):
            logits = self.model(tokens, pos, self._row_caches[row], mask, last)
        return logits[0].float() if all_logits else logits[0, 0].float()

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
        generators = None if greedy else make_generators(seed, len(prompts), self.device)
        eos = set(eos_ids)
        ended = [False] * len(prompts)
        with torch.inference_mode():
            self.reset()
            logits = self.prefill(prompts)
            pos = torch.as_tensor(lengths, device=self.device)[:, None]
        for t in range(max_new_tokens):
            with torch.inference_mode():  # entered per step: a suspended generator must not leak the mode
                if t == 0 or not greedy:
                    uniform = None if greedy else draw_uniform(generators, self.device)
                    nxt = sample_next(logits, temperature, top_k, top_p, uniform)
                out = nxt.tolist()
            yield out
            ended = [e or tok in eos for e, tok in zip(ended, out)]
            if all(ended) or t == max_new_tokens - 1:
                return
            with torch.inference_mode():
                slots = self.window(longest + t)
                if greedy:
                    nxt = self.greedy(nxt[:, None], pos, slots)
                else:
                    logits = self.step(nxt[:, None], pos, slots)
                pos = pos + 1


def make_generators(seed, batch: int, device) -> list[torch.Generator]:
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


def draw_uniform(generators: list[torch.Generator], device) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(device)


def get_decoder(model: nn.Module | Backend, batch_size: int, need: int) -> Decoder:
    """A Decoder for ``batch_size`` rows of ``need`` positions: the one the backend keeps for this shape (built on
    first use, and again when the weights changed), so a compiled step is compiled once."""
    backend = _backend(model)
    cache_len = _cache_len(need, backend.model.args.max_seq_len)
    return backend.kept((batch_size, cache_len), lambda: Decoder(backend, batch_size, cache_len))


def _check_lengths(args, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    max_seq_len = args.max_seq_len
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (the BOS token for unconditional text)")
        if len(p) + max_new_tokens > max_seq_len:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens and max_new_tokens is {max_new_tokens}: {len(p) + max_new_tokens} "
                f"positions exceed the model's max_seq_len={max_seq_len}; shorten the prompt or lower max_new_tokens")
        vocab = args.vocab_size
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def _token_stream(model, prompt_ids, max_new_tokens, *, temperature, top_k, top_p, seed, eos_ids):
    backend = _backend(model)
    prompt_ids = [[int(t) for t in p] for p in prompt_ids]
    _check_lengths(backend.model.args, prompt_ids, max_new_tokens)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    need = max(len(p) for p in prompt_ids) + max_new_tokens
    decoder = get_decoder(backend, len(prompt_ids), need)
    return decoder.stream(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, eos_ids=eos_ids)


def _eos_set(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, int):
        return () if eos_id < 0 else (eos_id,)
    return tuple(int(e) for e in eos_id if e >= 0)


def generate_tokens(model: nn.Module | Backend, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    seed: int | Sequence[int] | None = None, eos_id: int | Iterable[int] | None = None
                    ) -> list[list[int]]:
    """New token ids for each prompt (lists of ids); no tokenizer needed.

    ``model``: a model, decoded eagerly, or its backend (``llamalab.inference.backend.accelerate``), which keeps
    its Decoders (and compiled steps) from one call to the next.

    A row stops at the first token in ``eos_id`` (which is kept as its last token) or after
    ``max_new_tokens``. ``seed`` (an int, or one per prompt) makes sampling reproducible.
    """
    eos = _eos_set(eos_id)
    out: list[list[int]] = [[] for _ in prompt_ids]
    ended = [False] * len(prompt_ids)
    for step in _token_stream(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, eos_ids=eos):
        for i, tok in enumerate(step):
            if not ended[i]:
                out[i].append(tok)
                ended[i] = tok in eos
    return out


class TextTracker:
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


def generate(model: nn.Module | Backend, tokenizer, prompts, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False, bos: bool = True):
    """Generate text continuing ``prompts`` (a str, a list of str, or token-id lists) with ``model`` or its
    backend (see ``generate_tokens``).

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
                          top_p=top_p, seed=seed, eos_ids=eos)
    trackers = [TextTracker(tokenizer, p, stops) for p in prompt_ids]
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


def _stream_text(steps, tracker: TextTracker, eos) -> Iterator[str]:
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
