"""Helpers of the decode tests: prompts, model copies, teacher-forced step logits, counting compiled graphs."""

from __future__ import annotations

import contextlib

import torch

from llamalab.generate import get_decoder
from llamalab.inference.backend import Backend
from llamalab.model import build_model

PROMPTS = [[1, 17, 40, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207], [1]]


def copy_model(model, dtype=torch.float32, device="cpu"):
    m = build_model(model.args, device=device, init=False).eval()
    m.load_state_dict(model.state_dict())
    return m.to(dtype)


def decode_logits(model: torch.nn.Module | Backend, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Step logits (batch, steps, vocab) of teacher-forced decoding after a prefill, by ``model`` (eager) or a
    backend (its kept Decoder for this shape, so a later ``generate_tokens`` reuses its compiled step).

    Only the first step may compile: any recompile as the position (and the attention window) moves fails here.
    """
    decoder = get_decoder(model, tokens.shape[0], tokens.shape[1])
    out = []
    with torch.inference_mode():
        decoder.prefill(tokens[:, :prefill].tolist())
        for t in range(prefill, tokens.shape[1]):
            pos = torch.full((tokens.shape[0], 1), t, device=tokens.device)
            with torch._dynamo.config.patch(error_on_recompile=t > prefill):
                out.append(decoder.step(tokens[:, t:t + 1], pos, decoder.window(t)))
    return torch.stack(out, 1)


@contextlib.contextmanager
def graphs_compiled():
    """Counts the graphs dynamo compiles inside (``[n]`` after the block)."""
    stats = torch._dynamo.utils.counters["stats"]
    before, count = stats["unique_graphs"], []
    yield count
    count.append(stats["unique_graphs"] - before)
