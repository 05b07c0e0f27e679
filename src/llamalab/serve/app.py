"""The HTTP side of ``llamalab serve``: OpenAI's completions and chat completions (streamed as server-sent events
or not), vLLM's tokenizer endpoints (which lm-evaluation-harness's ``local-completions`` uses), health and
Prometheus metrics, over one ``Engine``.

Every choice of every request is one engine request. Its text is the tokens decoded with the prompt (so a
leading space survives) and cut at the first stop string; a stop string that spans tokens is caught, and a
stream holds back any tail that may still become one (``TextTracker``), so it never reaches the client. User
mistakes are OpenAI-style error bodies with a 4xx status; the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..generate import ContextLengthError, TextTracker
from .chat import ChatFormat
from .engine import Engine, Event, Overloaded, Sampling, TokenLogprob
from .engine import Request as EngineRequest
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, unsupported_fields

__all__ = ["ApiError", "create_app"]

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
DISCONNECT_POLL_S = 1.0  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    """An OpenAI-style error: ``status``, a message, the parameter it concerns, a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Served:
    """What the app serves: the engine, the tokenizer, the chat format and the name clients ask for."""

    engine: Engine
    tokenizer: object
    chat: ChatFormat
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    http: dict = field(default_factory=dict)  # responses by status, for /metrics


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="llamalab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif first.get("type") == "missing":
            message = f"missing required parameter: {param}" if param else "the request body is missing"
        else:
            message = f"{param}: {message}" if param else message
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404
                        else "invalid_request_error").response()

    app.add_middleware(CountStatus, counts=served.http)

    def authorize(request: Request) -> None:
        if served.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {served.api_key}":
            raise ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != served.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{served.model_name}'",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card(served)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(served), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = served.tokenizer
        return {"tokenizer_class": "SentencePiece", "bos_token": _piece(tok, tok.bos_id),
                "eos_token": _piece(tok, tok.eos_id), "pad_token": _piece(tok, tok.pad_id),
                "chat_template": served.chat.template_text, "model_max_length": served.engine.context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        authorize(request)
        if body.messages is not None:
            ids = chat_prompt(served, body.messages)
        else:  # "<s>", "</s>" in the text as their ids, as vLLM's Hugging Face tokenizer reads them (lm-eval's
            # RemoteTokenizer finds the BOS and EOS ids so); other text as tokenizer.encode
            bos = [served.tokenizer.bos_id] if body.add_special_tokens and served.tokenizer.bos_id >= 0 else []
            ids = bos + served.chat.encode_text(body.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.engine.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        authorize(request)
        vocab = served.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"tokens: ids outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    def admit(body, request: Request) -> None:
        """What every generation request must pass: the API key, the model's name, only supported fields."""
        authorize(request)
        check_model(body.model)
        refuse_unsupported(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        admit(body, request)
        prompts = completion_prompts(served, body.prompt)
        sampling = Sampling(max_tokens=body.max_tokens,
                            temperature=body.temperature, top_k=body.top_k_or_none(), top_p=body.top_p,
                            logprobs=body.logprobs, prompt_logprobs=body.echo and body.logprobs is not None)
        run = Run(served, "text_completion", prompts, sampling, body)
        return await run.respond(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        admit(body, request)
        prompt = chat_prompt(served, body.messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is None:  # the rest of the context (at least 1, so a prompt that fills it is a context error)
            limit = max(served.engine.context - len(prompt), 1)
        sampling = Sampling(max_tokens=limit, temperature=body.temperature, top_k=body.top_k_or_none(),
                            top_p=body.top_p, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        run = Run(served, "chat.completion", [prompt], sampling, body)
        return await run.respond(request)

    return app


class CountStatus:
    """Counts responses by status (for /metrics). A plain ASGI middleware: Starlette's ``@app.middleware("http")``
    (BaseHTTPMiddleware) hides a client's disconnect from ``request.is_disconnected()``, so a whole (non-streamed)
    request whose client went away would decode to its end."""

    def __init__(self, app, counts: dict):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] = self.counts.get(message["status"], 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def model_card(served: Served) -> dict:
    return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "llamalab",
            "max_model_len": served.engine.context, "chat_template": served.chat.name}


def refuse_unsupported(body) -> None:
    names = unsupported_fields(body)
    if names:
        raise ApiError(400, f"{names[0]}: not supported by this server", param=names[0])


def completion_prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids for each prompt: text is tokenized with a BOS; token ids are taken as given."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: give at least one prompt", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = served.tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "prompt: a token-id prompt is empty", param="prompt")
        out.append(ids)
    return out


def chat_prompt(served: Served, messages) -> list[int]:
    try:
        return served.chat.prompt_ids([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                       for m in messages])
    except UserError as exc:
        raise ApiError(400, str(exc), param="messages") from None


@dataclass
class Choice:
    """One choice's text, tokens and log-probabilities as its events arrive."""

    index: int
    prompt: list[int]
    request: EngineRequest
    tracker: TextTracker
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    unsent: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not yet streamed
    finish_reason: str | None = None
    error: str | None = None
    first_token_s: float | None = None

    def take(self, event: Event, engine: Engine) -> bool:
        """Fold ``event`` in; True when the choice has ended."""
        if event.kind == "prompt":
            self.prompt_logprobs = event.prompt
        elif event.kind == "token" and self.finish_reason is None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                self.logprobs.append(event.logprob)
                self.unsent.append(event.logprob)
            self.tracker.add(event.token)
            if self.tracker.stopped:
                self.finish_reason = "stop"
                engine.cancel(self.request)
        elif event.kind == "finished":
            if event.reason == "error":
                self.error = event.error or "the decode step failed"
            if self.finish_reason is None:
                self.finish_reason = "stop" if event.reason in ("stop", "cancelled") else "length"
            return True
        return False


class Run:
    """One HTTP request: its choices in the engine, answered whole or streamed."""

    def __init__(self, served: Served, kind: str, prompts: list[list[int]], sampling: Sampling, body):
        self.served, self.kind, self.body, self.sampling = served, kind, body, sampling
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompts = prompts
        self.stops = body.stops()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        engine = served.engine
        try:
            for p in prompts:
                engine.check(p, sampling)
        except ContextLengthError as exc:
            raise ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
        except UserError as exc:
            raise ApiError(400, str(exc), param="prompt") from None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.served.engine

        def sink_for(index: int):
            return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        for prompt in self.prompts:
            for j in range(self.body.n):
                index = len(self.choices)
                seed = None if self.body.seed is None else self.body.seed + j  # choice j: seed + j
                sampling = dataclasses.replace(self.sampling, seed=seed)
                request = EngineRequest(prompt, sampling, sink=sink_for(index))
                self.choices.append(Choice(index, prompt, request, TextTracker(self.served.tokenizer, prompt,
                                                                               self.stops)))
        try:
            for choice in self.choices:
                engine.submit(choice.request)
        except Overloaded as exc:
            self.cancel()
            raise ApiError(429, str(exc), kind="server_busy", code="overloaded", headers={"Retry-After": "1"}) \
                from None

    def cancel(self) -> None:
        for choice in self.choices:
            self.served.engine.cancel(choice.request)

    async def respond(self, request: Request):
        self.start()
        if self.body.stream:
            return StreamingResponse(self.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await self.collect(request)
        except BaseException:
            self.cancel()
            raise
        return JSONResponse(self.whole())

    async def collect(self, request: Request) -> None:
        open_choices = len(self.choices)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while open_choices:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                index = None
            if time.monotonic() >= next_check:  # by the clock: tokens may arrive more often than the poll's timeout
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.cancel()
                    return
            if index is not None:
                open_choices -= self.choices[index].take(event, self.served.engine)
        errors = [c.error for c in self.choices if c.error]
        if errors:
            raise ApiError(500, f"the server failed while decoding: {errors[0]}", kind="server_error")

    # -- whole responses ---------------------------------------------------------------------------------------

    def whole(self) -> dict:
        chat = self.kind == "chat.completion"
        choices = []
        for c in self.choices:
            text = c.tracker.final()
            if chat:
                entry = {"index": c.index, "message": {"role": "assistant", "content": text},
                         "logprobs": self.chat_logprobs(c.logprobs) if self.sampling.logprobs is not None else None,
                         "finish_reason": c.finish_reason}
            else:
                echo = self.body.echo
                prompt_text = c.tracker.prompt_text if echo else ""
                entry = {"index": c.index, "text": prompt_text + text, "finish_reason": c.finish_reason,
                         "logprobs": self.completion_logprobs(c, echo) if self.sampling.logprobs is not None
                         else None}
            choices.append(entry)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.served.model_name,
                "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion_logprobs(self, c: Choice, echo: bool, entries: list[TokenLogprob] | None = None,
                            offset: int = 0) -> dict:
        """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (prompt first with
        ``echo``; the first prompt token has no log-probability)."""
        entries = ([*c.prompt_logprobs, *c.logprobs] if echo else c.logprobs) if entries is None else entries
        tok = self.served.tokenizer
        tokens, offsets = [], []
        for e in entries:
            offsets.append(offset)
            text = token_text(tok, e.token)[0]
            tokens.append(text)
            offset += len(text)
        top = [None if e.logprob is None else {token_text(tok, t)[0]: lp for t, lp in e.top} for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        tok = self.served.tokenizer

        def one(token: int, logprob: float) -> dict:
            text, raw = token_text(tok, token)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}

    # -- streams -----------------------------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[str]:
        chat = self.kind == "chat.completion"
        try:
            if chat:
                for c in self.choices:
                    yield self.chunk(c.index, {"role": "assistant", "content": ""})
            elif self.body.echo and self.sampling.logprobs is None:  # no "prompt" event will come to carry it
                for c in self.choices:
                    yield self.chunk(c.index, c.tracker.prompt_text)
            open_choices = len(self.choices)
            while open_choices:
                index, event = await self.queue.get()
                c = self.choices[index]
                was_open = c.finish_reason is None
                ended = c.take(event, self.served.engine)
                open_choices -= ended
                if event.kind == "prompt" and not chat and self.body.echo:
                    yield self.chunk(c.index, c.tracker.prompt_text, self.completion_logprobs(
                        c, True, list(c.prompt_logprobs)) if self.sampling.logprobs is not None else None)
                if not was_open and not ended:
                    continue
                if ended or c.finish_reason is not None:
                    c.tracker.stopped = True  # flush what was held back for a stop string
                piece = c.tracker.ready()
                if piece or (ended and c.unsent):
                    yield self.chunk(c.index, piece if not chat else {"content": piece}, self.stream_logprobs(c))
                if ended:
                    if c.error:
                        yield _sse({"error": {"message": f"the server failed while decoding: {c.error}",
                                              "type": "server_error", "param": None, "code": None}})
                    yield self.chunk(c.index, "" if not chat else {}, None, c.finish_reason)
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield _sse({"id": self.id, "object": self.chunk_kind, "created": self.created,
                            "model": self.served.model_name, "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # the client went away (or we are done: cancelling a finished request is a no-op)

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"

    def stream_logprobs(self, c: Choice):
        if self.sampling.logprobs is None:
            return None
        entries, c.unsent = c.unsent, []
        if self.kind == "chat.completion":
            return self.chat_logprobs(entries)
        return self.completion_logprobs(c, False, entries)

    def chunk(self, index: int, content, logprobs=None, finish_reason: str | None = None) -> str:
        if self.kind == "chat.completion":
            choice = {"index": index, "delta": content, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish_reason}
        return _sse({"id": self.id, "object": self.chunk_kind, "created": self.created,
                     "model": self.served.model_name, "choices": [choice]})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _piece(tok, token_id: int) -> str | None:
    return tok.id_to_piece(token_id) if token_id is not None and token_id >= 0 else None


def token_text(tok, token_id: int) -> tuple[str, bytes]:
    """A token's text as OpenAI shows it (SentencePiece's ``▁`` as a space; a byte-fallback piece of a non-ASCII
    byte as ``bytes:\\xNN``) and its bytes."""
    piece = tok.id_to_piece(token_id)
    byte = BYTE_PIECE.fullmatch(piece)
    if byte:
        value = int(byte.group(1), 16)
        raw = bytes([value])
        return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), raw
    text = piece.replace("\u2581", " ")
    return text, text.encode("utf-8")


def prometheus(served: Served) -> str:
    """The engine's counters and gauges in Prometheus' text format."""
    stats = served.engine.stats()
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP llamalab_{name} {help_text}", f"# TYPE llamalab_{name} {kind}"])
        lines.extend(f"llamalab_{name}{labels} {value}" for labels, value in samples)

    metric("requests_total", "counter", "Engine requests accepted (one per choice).", [("", stats.get("requests", 0))])
    metric("requests_rejected_total", "counter", "Requests refused because the queue was full.",
           [("", stats.get("rejected", 0))])
    metric("requests_finished_total", "counter", "Engine requests ended, by reason.",
           [(f'{{reason="{k.removeprefix("finished_")}"}}', v) for k, v in sorted(stats.items())
            if k.startswith("finished_")] or [('{reason="stop"}', 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens accepted.", [("", stats.get("prompt_tokens", 0))])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", stats.get("generated_tokens", 0))])
    metric("decode_steps_total", "counter", "Batched decode steps run.", [("", stats.get("steps", 0))])
    metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", stats["waiting"])])
    metric("slots_busy", "gauge", "Slots decoding a request.", [("", stats["slots_busy"])])
    metric("slots", "gauge", "Slots (rows of the batched key/value cache).", [("", stats["slots"])])
    metric("http_responses_total", "counter", "HTTP responses, by status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(served.http.items())] or [('{status="200"}', 0)])
    return "\n".join(lines) + "\n"
