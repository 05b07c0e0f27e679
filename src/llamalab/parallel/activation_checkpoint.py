"""Activation checkpointing per transformer block, as in the paper (section 2.4).

``full``: keep only each block's input; recompute the whole block in the backward pass.

``selective``: keep, for each block, the outputs of

* the attention kernel (``scaled_dot_product_attention``: its output and log-sum-exp; recomputing it is the one
  cost in a block that grows with the sequence length),
* the feed-forward's input projections ``w1`` and ``w3`` (the SwiGLU gate and up tensors, the block's widest
  matrix products), and
* under tensor parallelism, the reduce-scatters after ``wo`` and ``w2`` (small, and recomputing them would repeat
  communication in the backward pass);

and recompute the rest in the backward pass: both RMSNorms, the ``wq``/``wk``/``wv`` projections, the rotary
embeddings, ``wo``, SiLU and the gating product, and autocast's casts. The outputs of ``wo`` and ``w2`` are never
saved: the backward pass never reads them (they are only added to the residual stream), so keeping them, as a
"save every matmul" policy does, costs memory for nothing.

Why these: every input projection costs the same compute per byte it keeps (2·dim FLOPs per output element,
2 bytes in bf16), so the only choice is how much to recompute for how much memory. Keeping all the projection
outputs the backward reads (q/k/v, w1, w3) recomputes only ``wo`` (~3% more block compute at LLaMA's shapes) but
saves only 23.5% of ``bench/train.py``'s stories15m activations in fp32, where its fp32 logits (250 MiB of 594)
weigh most; recomputing q/k/v too (``wo`` + q/k/v = 8·dim² of a block's 8·dim² + 6·dim·ffn forward FLOPs per
token, ~11% more block compute) is the cheapest step past 30% in both precisions (40.9% bf16, 30.3% fp32);
recomputing w1/w3 instead of q/k/v would cost 1.6x that for 45.5% / 35.6%. Measured step-time costs and the
numbers behind them are in ``docs/scaling.md``.

The policy is a ``torch.utils.checkpoint`` selective-checkpoint context. Its dispatch mode sees aten ops, not
modules, so it recognises ``w1`` and ``w3`` by the shape of the weight their matrix product reads (dim -> SwiGLU
width; no other projection of a block has it, since the SwiGLU width is neither dim nor the key/value width):
unlike counting products, that holds under ``torch.compile``, tensor parallelism (global or local shapes) and
LoRA adapters. Recomputation repeats the same kernels on the same inputs, so gradients are bit-identical to
those without checkpointing, with or without autocast.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

# The projections of a TransformerBlock whose outputs ``selective`` keeps (submodule paths).
SAVED_PROJECTIONS = ("feed_forward.w1", "feed_forward.w3")


def _ops(namespace, names: list[str]) -> frozenset:
    return frozenset(getattr(namespace, name).default for name in names if hasattr(namespace, name))


MATMUL_OPS = _ops(torch.ops.aten, ["mm", "addmm", "bmm"])
# Saved wherever they occur in a block: the attention kernels, and the reduce-scatter of tensor parallelism.
SAVED_OPS = _ops(torch.ops.aten, [
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
]) | _ops(torch.ops._c10d_functional, ["reduce_scatter_tensor"])


def saved_weight_shapes(block: nn.Module) -> frozenset[tuple[int, int]]:
    """Shapes of the (transposed) weights that the matrix products of ``SAVED_PROJECTIONS`` read: (in, out),
    both global and, for a tensor-parallel DTensor weight, local."""
    shapes = set()
    for path in SAVED_PROJECTIONS:
        weight = block.get_submodule(path).weight
        shapes.add(tuple(weight.shape)[::-1])
        if hasattr(weight, "to_local"):
            shapes.add(tuple(weight.to_local().shape)[::-1])
    return frozenset(shapes)


class SelectivePolicy:
    """The ``selective`` decision for each aten op of a checkpointed block's forward pass."""

    def __init__(self, weight_shapes: frozenset[tuple[int, int]]) -> None:
        self.weight_shapes = weight_shapes  # from ``saved_weight_shapes``

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in SAVED_OPS:
            return CheckpointPolicy.MUST_SAVE
        if op in MATMUL_OPS:  # mm(x, w.t()), addmm(bias, x, w.t()), bmm(x, w): the weight is the last argument
            shape = args[-1].shape[-2:]
            if any(shape == saved for saved in self.weight_shapes):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context(weight_shapes: frozenset[tuple[int, int]]):
    return create_selective_checkpoint_contexts(SelectivePolicy(weight_shapes))


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
    for block in model.layers.values():
        context_fn = functools.partial(selective_context, saved_weight_shapes(block)) if mode == "selective" else None
        block.forward = functools.partial(_checkpointed_forward, block.forward, context_fn)
    return model
