"""The LLaMA model: hyper-parameters, presets and the transformer."""

from .args import PRESETS, ConfigError, ModelArgs, Preset, Recipe, get_preset, preset_args
from .dropout import apply_dropout
from .llama import (
    Attention,
    FeedForward,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rotary,
    build_model,
    rope_tables,
)

__all__ = [
    "PRESETS", "ConfigError", "ModelArgs", "Preset", "Recipe", "get_preset", "preset_args",
    "apply_dropout", "Attention", "FeedForward", "RMSNorm", "Transformer", "TransformerBlock", "apply_rotary",
    "build_model", "rope_tables",
]
