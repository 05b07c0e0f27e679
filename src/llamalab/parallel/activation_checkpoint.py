"""Activation checkpointing per transformer block, as in the paper (section 2.4).

``full``: keep only each block's input; recompute the whole block in the backward pass.
``selective``: keep the outputs of the expensive ops -- matrix multiplications and the attention kernel -- and
recompute only the cheap element-wise work (RMSNorm, rotary embeddings, SiLU, the gating product, casts), which
the paper describes as saving the activations that are expensive to compute.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")


def _expensive_ops() -> set:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention"]
    return {getattr(aten, name).default for name in names if hasattr(aten, name)}


SAVED_OPS = _expensive_ops()


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls_policy)


def _checkpointed_forward(forward, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and generation: nothing to save
        return forward(*args, **kwargs)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block in ``model.layers`` in place; parameter names are unchanged.

    The block's ``forward`` is wrapped on the instance rather than the block being wrapped in another module, so
    state dicts (and checkpoints, and Meta's names) look the same with and without checkpointing.
    """
    if mode not in MODES:
        raise ValueError(f"activation_checkpoint.mode: expected one of {MODES}, got {mode!r}")
    if mode == "none":
        return model
    context_fn = selective_context if mode == "selective" else None
    for block in model.layers.values():
        block.forward = functools.partial(_checkpointed_forward, block.forward, context_fn)
    return model
