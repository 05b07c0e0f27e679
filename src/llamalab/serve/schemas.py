"""The request bodies the server accepts: OpenAI's, checked field by field (a wrong one is a 400 naming it).

Unknown fields are accepted and ignored, as OpenAI's own clients send some (``user``, ``metadata``); the ones
that would change the output but are not implemented (penalties, ``logit_bias``, ``best_of``, ``suffix``,
tools) are refused when set to anything but their neutral value, rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ChatRequest", "CompletionRequest", "DetokenizeRequest", "Message", "TokenizeRequest",
           "unsupported_fields"]

MAX_N = 16  # choices per request: each takes a slot
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token

NonNegativeInt = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="extension: sample from the k most likely tokens (-1 or 0: off)")
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a torch.Generator seed (choice j: seed + j)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """``null`` means the default, as in OpenAI's API and vLLM (clients send it for parameters left unset)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4:
            raise ValueError("stop: at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop: stop sequences must be non-empty")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError("top_k: -1 or 0 (off) or a positive integer")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_k_or_none(self) -> int | None:
        return self.top_k if self.top_k and self.top_k > 0 else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegativeInt = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: NonNegativeInt | None = None
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs = true")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` or chat ``messages``."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokens: list[int]


NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None, "tools": None,
           "functions": None, "response_format": None}


def unsupported_fields(body: BaseModel) -> list[str]:
    """Fields set to a value this server would have to honour but does not implement."""
    extra = body.model_extra or {}
    found = [key for key, neutral in NEUTRAL.items() if extra.get(key) not in (neutral, None, {}, [], "")]
    if isinstance(extra.get("response_format"), dict) and extra["response_format"].get("type") == "text":
        found.remove("response_format")
    best_of = extra.get("best_of")
    if best_of is not None and best_of != getattr(body, "n", 1):
        found.append("best_of")
    return found
