"""Turn a plain ``Transformer`` into a parallel one, in torchtitan's (2024) order.

1. tensor parallel with sequence parallel on the norms and a vocabulary-parallel output (``tp``);
2. activation checkpointing (the training code's ``apply_activation_checkpointing``);
3. ``torch.compile`` of each block;
4. FSDP2 ``fully_shard`` of each block and of the root, with bf16 compute / fp32 gradient reduction and explicit
   prefetching (``dp_shard``, HSDP with ``dp_replicate``), or DDP through composable ``replicate`` when
   ``dp_replicate`` is the only data parallelism.

Each step only slices or wraps the existing tensors, so the model must either be fully initialised with the
same seed on every rank before this runs, or be built on the meta device and filled with rank 0's full weights
afterwards (``ParallelRun.materialize``); either way every layout starts from the weights one process would.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from .mesh import ParallelDims

# A block's attention gets (x, cos, sin, cache, input_pos, mask); only x is a tensor to redistribute.
_ATTENTION_INPUTS = 6


def parallelize_model(model: nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, *, ac_mode: str = "none",
                      compile: bool = False, mixed_precision: str | torch.dtype | None = None) -> nn.Module:
    """Apply TP/SP, activation checkpointing, compile and FSDP2/DDP to ``model`` in place; returns it.

    Without a mesh (one process) only activation checkpointing and compile apply: every world size takes this
    one path.

    ``mixed_precision`` "bf16" (or a dtype) makes FSDP2 compute in that dtype and reduce gradients in fp32; the
    sharded master weights stay fp32. With DDP (no FSDP) it is ignored: use autocast instead.
    ``model`` may be a pipeline stage (some layers removed, ``tok_embeddings``/``norm``/``output`` None).
    """
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], loss_parallel=True, compiled_blocks=compile)
    if ac_mode and ac_mode != "none":
        from .activation_checkpoint import apply_activation_checkpointing

        apply_activation_checkpointing(model, ac_mode)
    if compile and mesh is None:  # nothing sharded: one graph, so the embedding, norm and output fuse too
        model.compile()
    elif compile:
        for block in model.layers.values():
            block.compile(fullgraph=True)
    if dims.fsdp_enabled:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, param_dtype=_dtype(mixed_precision),
                   reshard_after_forward=not dims.pp_enabled)
    elif dims.ddp_enabled:
        apply_ddp(model, mesh["dp_replicate"])
    return model


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    table = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if value not in table:
        raise ValueError(f"mixed_precision must be one of {sorted(table)}, got {value!r}")
    return table[value]


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool = True,
                          compiled_blocks: bool = False) -> None:
    """Megatron-style TP with sequence parallelism (Korthikanti et al., 2022) through DTensor plans.

    Between blocks the residual stream is sharded along the sequence (``Shard(1)``); norms run on their shard;
    attention and the feed-forward all-gather the sequence, split heads / hidden units column-wise and
    reduce-scatter back. The output layer leaves logits sharded over the vocabulary, so the loss must be
    computed inside ``loss_parallel_context`` (forward and backward).
    """
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    if top_plan:
        parallelize_module(model, tp_mesh, top_plan)
    if compiled_blocks and model.tok_embeddings is not None:
        # torch 2.13 CPU: a compiled block's backward fails on the embedding's DTensor-derived output
        # ('Tensor' object has no attribute '_local_tensor') unless it is a fresh tensor.
        model.tok_embeddings.register_forward_hook(lambda _mod, _inp, out: out.clone())

    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1),) + (None,) * (_ATTENTION_INPUTS - 1),
            desired_input_layouts=(Replicate(),) + (None,) * (_ATTENTION_INPUTS - 1)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2 per block and at the root (a 2-D ``dp_mesh`` gives HSDP: shard inside, replicate across).

    The last block keeps its parameters gathered after forward (backward needs them at once). Each block
    prefetches the next one's all-gather in forward and the previous one's in backward, so communication
    overlaps the current block's compute. Pipeline stages keep parameters gathered across micro-batches.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for prev, nxt in zip(blocks, blocks[1:]):
        prev.set_modules_to_forward_prefetch([nxt])
        nxt.set_modules_to_backward_prefetch([prev])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Plain data parallelism: composable ``replicate`` (DDP without renaming parameters)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)


def loss_parallel_context(dims: ParallelDims | None):
    """The context the loss (forward and backward) must run in: vocabulary-parallel cross entropy under TP."""
    return loss_parallel() if dims is not None and dims.tp_enabled else contextlib.nullcontext()
