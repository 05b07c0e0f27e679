"""Continuous batching: ``slots`` requests decode together on one batched static key/value cache.

A request takes a free slot (a row of the ``Decoder``'s cache) at a step boundary: its prompt is prefilled into
that row alone (``Decoder.prefill_row``) while the other rows keep their state, and from then on it advances one
token per step with every other busy row, each at its own position (the Decoder's per-row positions and mask).
It leaves when it ends (EOS, ``max_tokens``, or cancelled by its client), and the next waiting request takes the
row. Rows without a request step on a dummy token at position 0 of their own row, which nothing reads.

A request's tokens do not depend on its neighbours: each row attends only to its own slots, and sampling draws
from a per-request ``torch.Generator`` seeded as ``llamalab generate`` seeds it, one uniform number per token,
through the same ``sample_next``. Greedy and seeded requests therefore give the tokens ``generate`` gives alone.

The loop runs in one background thread; clients hand requests in with ``submit`` and read ``Event``s from the
request's sink (a thread-safe queue by default; the HTTP server passes its event loop's).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..generate import ContextLengthError, Decoder, draw_uniform, make_generators, sample_next
from ..inference.backend import Backend

__all__ = ["Engine", "Event", "Overloaded", "Request", "Sampling", "TokenLogprob"]

log = logging.getLogger(__name__)


class Overloaded(UserError, RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass(frozen=True)
class Sampling:
    """One request's settings. ``logprobs``: how many alternatives to report per token (0: the chosen token's
    log-probability only; None: none). ``prompt_logprobs``: also score every prompt token (``echo``)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at that position, best first


@dataclass(frozen=True)
class Event:
    """``token`` (a generated token, with ``logprob`` when asked), ``prompt`` (the prompt's log-probabilities,
    once, before the first token, when asked) or ``finished`` (``reason``: ``stop`` at EOS, ``length`` after
    ``max_tokens``, ``cancelled``, or ``error`` with ``error``)."""

    kind: str
    token: int | None = None
    logprob: TokenLogprob | None = None
    prompt: tuple[TokenLogprob, ...] = ()
    reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[Event], None] | None = None  # called from the engine thread; default: ``events()``'s queue
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    _queue: queue.SimpleQueue | None = None

    def __post_init__(self):
        if self.sink is None:
            self._queue = queue.SimpleQueue()
            self.sink = self._queue.put

    def events(self) -> Iterator[Event]:
        """The events of a request submitted without a sink, until it finishes (blocking)."""
        while True:
            event = self._queue.get()
            yield event
            if event.kind == "finished":
                return


@dataclass
class _Slot:
    request: Request
    position: int  # where the next input token goes
    last: int  # the next input token: the last one generated
    generated: int
    generator: torch.Generator | None


class Engine:
    """``slots`` rows of ``context`` positions over ``backend``'s model; at most ``max_queue`` requests wait."""

    def __init__(self, backend: Backend, *, slots: int, eos_ids: Sequence[int] = (), context: int | None = None,
                 max_queue: int = 256):
        args = backend.model.args
        self.context = min(context or args.max_seq_len, args.max_seq_len)
        self.vocab_size = args.vocab_size
        self.decoder = Decoder(backend, slots, self.context)
        self.device = self.decoder.device
        self.eos = frozenset(int(e) for e in eos_ids if e is not None and e >= 0)
        self.max_queue = max_queue
        self.slots: list[_Slot | None] = [None] * slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.counters = collections.Counter()  # requests, prompt tokens, generated tokens, steps, by outcome
        self._ids = itertools.count(1)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llamalab-engine", daemon=True)
        self._thread.start()

    # -- the client side ---------------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], sampling: Sampling) -> None:
        """A ``UserError`` naming what is wrong with this request, before it is queued."""
        if not prompt:
            raise UserError("the prompt is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise UserError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if sampling.max_tokens < 0:
            raise UserError(f"max_tokens must be >= 0, got {sampling.max_tokens}")
        if sampling.max_tokens == 0 and not sampling.prompt_logprobs:
            raise UserError("max_tokens must be at least 1 (0 only with echo and logprobs, to score a prompt)")
        if len(prompt) + sampling.max_tokens > self.context:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {sampling.max_tokens}: "
                f"{len(prompt) + sampling.max_tokens} positions exceed the context of {self.context}; shorten the "
                "prompt or lower max_tokens")

    def submit(self, request: Request) -> Request:
        """Queue ``request`` (checked first); ``Overloaded`` when the waiting queue is full."""
        self.check(request.prompt, request.sampling)
        with self._wake:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.counters["rejected"] += 1
                raise Overloaded(f"all {len(self.slots)} slots are busy and {len(self.waiting)} requests are "
                                 "waiting; retry later")
            request.id = next(self._ids)
            self.waiting.append(request)
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += len(request.prompt)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (its client went away, or a stop string matched): its slot frees at the next step."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        with self._wake:
            busy = sum(s is not None for s in self.slots)
            return {**self.counters, "slots": len(self.slots), "slots_busy": busy, "waiting": len(self.waiting)}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._closed and not self.waiting and all(s is None for s in self.slots):
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._take_waiting()
            try:
                with torch.inference_mode():
                    for row, request in admitted:
                        self._admit(row, request)
                    self._step()
            except Exception as exc:  # a bug, not the client's input: end the requests in flight, keep serving
                log.exception("decode step failed")
                for row, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(row, "error", f"{type(exc).__name__}: {exc}")
        for row, slot in enumerate(self.slots):
            if slot is not None:
                self._finish(row, "cancelled")
        while self.waiting:
            self.waiting.popleft().sink(Event("finished", reason="cancelled"))

    def _take_waiting(self) -> list[tuple[int, Request]]:
        """(row, request) for each waiting request that gets a free row now; drops cancelled ones."""
        taken = []
        free = [row for row, slot in enumerate(self.slots) if slot is None]
        while free and self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
                self.counters["finished_cancelled"] += 1  # ended: /metrics' requests_finished_total counts it
                request.sink(Event("finished", reason="cancelled"))
                continue
            row = free.pop(0)
            self.slots[row] = _Slot(request, len(request.prompt), -1, 0, None)  # reserved; filled by _admit
            taken.append((row, request))
        return taken

    def _admit(self, row: int, request: Request) -> None:
        s = request.sampling
        logits = self.decoder.prefill_row(row, request.prompt, all_logits=s.prompt_logprobs)
        if s.prompt_logprobs:
            request.sink(Event("prompt", prompt=self._prompt_logprobs(request.prompt, logits, s.logprobs or 0)))
            logits = logits[-1]
        generator = None if s.temperature <= 0 else make_generators(s.seed, 1, self.device)[0]
        slot = self.slots[row] = _Slot(request, len(request.prompt), -1, 0, generator)
        if s.max_tokens == 0:
            self._finish(row, "length")
        else:
            self._emit(row, slot, logits)

    def _step(self) -> None:
        """One token for every busy row."""
        busy = [(row, slot) for row, slot in enumerate(self.slots) if slot is not None]
        for row, slot in busy:
            if slot.request.cancelled:
                self._finish(row, "cancelled")
        busy = [(row, slot) for row, slot in busy if self.slots[row] is slot]
        if not busy:
            return
        n = len(self.slots)
        tokens = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.zeros(n, 1, dtype=torch.long)
        for row, slot in busy:
            tokens[row, 0], pos[row, 0] = slot.last, slot.position
        window = self.decoder.window(max(slot.position for _, slot in busy))
        logits = self.decoder.step(tokens.to(self.device), pos.to(self.device), window)
        self.counters["steps"] += 1
        for row, slot in busy:
            slot.position += 1
            self._emit(row, slot, logits[row])

    def _emit(self, row: int, slot: _Slot, logits: torch.Tensor) -> None:
        """Choose ``slot``'s next token from its (vocab,) logits, send it, and end the request when it is done."""
        s = slot.request.sampling
        if s.temperature <= 0:
            token = int(logits.argmax())
        else:
            uniform = draw_uniform([slot.generator], self.device)
            token = int(sample_next(logits[None], s.temperature, s.top_k, s.top_p, uniform)[0])
        if token in self.eos:
            self._finish(row, "stop")
            return
        logprob = None
        if s.logprobs is not None:
            logprob = _token_logprob(torch.log_softmax(logits.float(), -1), token, s.logprobs)
        slot.generated += 1
        slot.last = token
        self.counters["generated_tokens"] += 1
        slot.request.sink(Event("token", token=token, logprob=logprob))
        if slot.generated >= s.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        slot, self.slots[row] = self.slots[row], None
        self.counters[f"finished_{reason}"] += 1
        slot.request.sink(Event("finished", reason=reason, error=error))

    @staticmethod
    def _prompt_logprobs(prompt: list[int], logits: torch.Tensor, top: int) -> tuple[TokenLogprob, ...]:
        """Each prompt token's log-probability given the tokens before it (the first has none)."""
        logprobs = torch.log_softmax(logits.float(), -1)
        out = [TokenLogprob(prompt[0], None)]
        out += [_token_logprob(logprobs[i - 1], prompt[i], top) for i in range(1, len(prompt))]
        return tuple(out)


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry of the (vocab,) log-probabilities, and the ``top`` best alternatives."""
    best = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)
