"""Dropout for data-limited training, applied to a built ``Transformer`` from outside.

LLaMA trains without dropout: every token it sees is new. A run that repeats a small corpus for many epochs
(Tiny Shakespeare) overfits, and the usual remedy is GPT-2's and nanoGPT's: drop units of the token embeddings
and of each residual branch's output (attention and feed-forward, before they are added to the stream). Forward
hooks do it, so the model file, its parameter names and every checkpoint format stay as they are; in eval mode
(validation, generation) the hooks pass their input through. The mask comes from torch's global generator,
which training checkpoints save, so a resumed run draws the same masks.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .args import ConfigError


def check_dropout(p: float, key: str = "model.dropout") -> float:
    """``p`` as a float; anything but a probability in [0, 1) is a ``ConfigError`` naming ``key``."""
    if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0.0 <= p < 1.0):
        raise ConfigError(f"{key}: expected a probability in [0, 1), got {p!r}")
    return float(p)


def apply_dropout(model: nn.Module, p: float) -> nn.Module:
    """Residual and embedding dropout with probability ``p`` on ``model`` (a ``Transformer`` or a pipeline stage
    of one); ``p = 0`` leaves it untouched. Returns the model."""
    p = check_dropout(p)
    if p == 0.0:
        return model

    def drop(module: nn.Module, args, output):
        return F.dropout(output, p, module.training)

    modules = [model.tok_embeddings] if getattr(model, "tok_embeddings", None) is not None else []
    for block in model.layers.values():
        modules += [block.attention, block.feed_forward]
    for module in modules:
        module.register_forward_hook(drop)
    return model
