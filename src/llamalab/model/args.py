"""Model hyper-parameters and the named presets (the LLaMA paper's Table 2 plus CPU sizes)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range; the message names the field."""


REQUIRED_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size")  # a stored config without them is not one


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or isinstance(self.n_kv_heads, bool) or self.n_kv_heads <= 0
        ):
            raise ConfigError(f"ModelArgs.n_kv_heads must be a positive integer or None, got {self.n_kv_heads!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"ModelArgs.dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"ModelArgs.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})"
            )
        if self.ffn_dim_multiplier is not None and not (
            isinstance(self.ffn_dim_multiplier, (int, float)) and self.ffn_dim_multiplier > 0
        ):
            raise ConfigError(f"ModelArgs.ffn_dim_multiplier must be a positive number or None, got {self.ffn_dim_multiplier!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive number, got {value!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU keeps the FLOPs of a 4d MLP with three matrices: 2/3 of 4d, rounded up to ``multiple_of``."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (embedding and output counted separately: LLaMA does not tie them)."""
        d, h, kv = self.dim, self.ffn_hidden_dim, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown model field(s) {unknown}; expected some of {sorted(names)}")
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise ConfigError(f"{source}: missing model field(s) {missing}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class Recipe:
    """The training recipe the paper used for a size (Table 2); CPU presets carry small-run defaults."""

    lr: float
    batch_tokens: int
    token_budget: int
    warmup_steps: int = 2000


@dataclass(frozen=True)
class Preset:
    name: str
    args: ModelArgs
    recipe: Recipe
    description: str = field(default="")


def _paper(dim: int, heads: int, layers: int, lr: float, tokens: float) -> tuple[ModelArgs, Recipe]:
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=heads, vocab_size=32000, multiple_of=256,
                     norm_eps=1e-6, max_seq_len=2048)
    return args, Recipe(lr=lr, batch_tokens=4 * 1024 * 1024, token_budget=int(tokens))


PRESETS: dict[str, Preset] = {
    "llama-7b": Preset("llama-7b", *_paper(4096, 32, 32, 3.0e-4, 1.0e12), "LLaMA 7B (paper Table 2)"),
    "llama-13b": Preset("llama-13b", *_paper(5120, 40, 40, 3.0e-4, 1.0e12), "LLaMA 13B (paper Table 2)"),
    "llama-33b": Preset("llama-33b", *_paper(6656, 52, 60, 1.5e-4, 1.4e12), "LLaMA 33B (paper Table 2)"),
    "llama-65b": Preset("llama-65b", *_paper(8192, 64, 80, 1.5e-4, 1.4e12), "LLaMA 65B (paper Table 2)"),
    "tiny": Preset(
        "tiny",
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                  norm_eps=1e-5, max_seq_len=128),
        Recipe(lr=1e-3, batch_tokens=8 * 128, token_budget=10**6, warmup_steps=10),
        "for tests: runs in milliseconds",
    ),
    "demo": Preset(
        "demo",
        ModelArgs(dim=256, n_layers=6, n_heads=8, vocab_size=4096, multiple_of=64, norm_eps=1e-5,
                  max_seq_len=256),
        Recipe(lr=2e-3, batch_tokens=16 * 256, token_budget=20 * 10**6, warmup_steps=50),
        "the `make demo` model: trains in minutes on 2 CPU cores",
    ),
    "stories15m": Preset(
        "stories15m",
        ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, norm_eps=1e-5,
                  max_seq_len=256),
        Recipe(lr=5e-4, batch_tokens=128 * 256, token_budget=300 * 10**6, warmup_steps=1000),
        "llama2.c's stories15M shape",
    ),
    "small": Preset(
        "small",
        ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                  max_seq_len=1024),
        Recipe(lr=6e-4, batch_tokens=64 * 1024, token_budget=10 * 10**9, warmup_steps=2000),
        "GPT-2 small sized LLaMA (about 134M parameters with a 32k vocabulary)",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def preset_args(name: str, **overrides) -> ModelArgs:
    """The preset's ModelArgs with some fields replaced (validated again)."""
    base = get_preset(name).args.to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(f"unknown model field(s) {unknown} for preset {name!r}")
    base.update(overrides)
    return ModelArgs(**base)


def ffn_params_for_hidden(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make ``ModelArgs.ffn_hidden_dim`` equal ``hidden_dim``.

    Formats such as Hugging Face, llama2.c and GGUF store the hidden size itself; LLaMA's args derive it.
    Prefer the largest plain ``multiple_of``; otherwise a multiplier that lands exactly on ``hidden_dim``.
    """
    base = int(2 * 4 * dim / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if multiple_of * math.ceil(base / multiple_of) == hidden_dim:
            return multiple_of, None
    return 1, (hidden_dim + 0.5) / base
