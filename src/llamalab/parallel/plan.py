"""Per-GPU memory of a training layout: parameters, gradients, optimizer state and activations.

An estimate from first principles for this code base (FSDP2 with bf16 compute and fp32 master weights,
gradients and AdamW moments; sequence-parallel TP; ``torch.distributed.pipelining`` schedules), counted the
way Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models") count saved
activations, but for LLaMA's blocks as written in ``llamalab.model.llama``:

per token and block, in bytes, with ``h`` = dim, ``kv`` = key/value width, ``f`` = SwiGLU hidden size, ``t`` = tp:

* ``none``: two RMSNorms (fp32 input copy + bf16 output: 6h each), rotary in fp32 for q and k (4(h + kv)),
  attention inputs and output (q, expanded k and v, output: 8h), the ``wo`` input (2h) and the SwiGLU tensors
  (w1 and w3 outputs, SiLU output, gated product: 8f), all divided by ``t``; under TP also the all-gathered
  inputs of the attention and the feed-forward (2h each, full sequence, not divided).
* ``selective`` (save matmul and attention outputs, recompute the rest): block input 2h, q/k/v 2(h + 2kv),
  attention output 2h, w1/w3 outputs 4f, all over ``t``, plus the ``wo``/``w2`` outputs before the TP
  reduce-scatter (2h each, not divided); one block's ``none`` activations are live while it is recomputed.
* ``full``: the block input (2h / t); one block's ``none`` activations are live during its recomputation.

The output layer keeps bf16 logits, their fp32 copy and log-softmax (10 bytes per vocabulary entry, over ``t``),
and backward adds an fp32 logits gradient (4 bytes). A fixed reserve covers the CUDA context, NCCL buffers and
allocator slack. Real usage also depends on fragmentation, so treat a fit within ~10% as marginal. On a CPU,
heads of at most 32 dimensions are attended in fp32 (``llamalab.model.llama.causal_attention``), which keeps
fp32 copies of q, k, v and the attention output: more than counted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.args import ModelArgs
from .mesh import ParallelDims

GiB = 1024**3
AC_MODES = ("none", "selective", "full")
RESERVE_BYTES = int(1.5 * GiB)


@dataclass
class Estimate:
    """Bytes per rank (the most loaded rank: the pipeline's first stage for activations)."""

    params: int
    grads: int
    optimizer: int
    gathered: int  # FSDP's unsharded bf16 parameters and gradients in flight (or DDP's bf16 autocast copies)
    activations: int
    reserve: int = RESERVE_BYTES

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations + self.reserve


def layer_params(args: ModelArgs) -> int:
    d, f, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    return 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d


def activation_bytes_per_token(args: ModelArgs, tp: int, mode: str) -> tuple[float, float]:
    """(bytes kept per token for one block, extra bytes per token live while one block is recomputed)."""
    h, f, kv, t = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim, tp
    gathered = 4 * h if t > 1 else 0
    none = (12 * h + 4 * (h + kv) + 8 * h + 2 * h + 8 * f) / t + gathered
    if mode == "none":
        return none, 0.0
    if mode == "selective":
        return (2 * h + 2 * (h + 2 * kv) + 2 * h + 4 * f) / t + 4 * h, none
    if mode == "full":
        return 2 * h / t, none
    raise ValueError(f"activation checkpoint mode must be one of {AC_MODES}, got {mode!r}")


def estimate(args: ModelArgs, dims: ParallelDims, *, micro_batch: int, seq_len: int, ac_mode: str = "none",
             pp_schedule: str = "1F1B", pp_microbatches: int = 1) -> Estimate:
    """Memory per rank for AdamW training with bf16 compute (FSDP2 mixed precision or autocast)."""
    t, pp = dims.tp, dims.pp
    embed = args.vocab_size * args.dim
    layers_per_stage = math.ceil(args.n_layers / pp)
    # the heaviest stage: with pp=1 everything; otherwise the first (embedding) or last (output + norm)
    stage_params = layers_per_stage * layer_params(args) + (2 * embed + args.dim if pp == 1 else embed + args.dim)
    local = stage_params / t
    shard = dims.dp_shard if dims.fsdp_enabled else 1
    sharded = local / shard
    params, grads, optimizer = 4 * sharded, 4 * sharded, 8 * sharded
    if dims.fsdp_enabled:
        block = layer_params(args) / t
        if pp > 1:  # stages keep parameters gathered across micro-batches
            gathered = 2 * local + 2 * (4 + 2) * block
        else:  # current and prefetched block (bf16 params, bf16 grads + fp32 reduce copy), plus the root
            gathered = 2 * (2 + 2 + 4) * block + 2 * (2 * embed / t)
    else:
        gathered = 2 * local  # autocast's bf16 weight copies
    per_block, recompute = activation_bytes_per_token(args, t, ac_mode)
    if pp > 1:
        mb = max(1, micro_batch // max(1, pp_microbatches))
        in_flight = pp_microbatches if pp_schedule.lower() == "gpipe" else min(pp, pp_microbatches)
        if pp_schedule.lower() in ("interleaved1f1b", "loopedbfs"):
            in_flight = min(pp_microbatches, 2 * pp)  # looped schedules warm up more micro-batches
        tokens = mb * seq_len
        stored = in_flight * tokens * per_block * layers_per_stage
    else:
        tokens = micro_batch * seq_len
        stored = tokens * per_block * args.n_layers
    head = tokens * (14 * args.vocab_size / t + 8 * args.dim / t)  # logits, loss, final norm
    activations = stored + tokens * recompute + head
    return Estimate(params=int(params), grads=int(grads), optimizer=int(optimizer), gathered=int(gathered),
                    activations=int(activations))


def candidate_layouts(gpus: int, args: ModelArgs, gpus_per_node: int = 8) -> list[ParallelDims]:
    """Layouts worth trying on ``gpus`` GPUs: TP within a node, PP across, FSDP over the rest."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > min(gpus, gpus_per_node) or args.kv_heads % tp or args.vocab_size % tp or args.ffn_hidden_dim % tp:
            continue
        for pp in (1, 2, 4, 8, 16):
            if gpus % (tp * pp) or pp > args.n_layers:
                continue
            out.append(ParallelDims(dp_replicate=1, dp_shard=gpus // (tp * pp), tp=tp, pp=pp, world_size=gpus))
    return out


def format_bytes(n: float) -> str:
    return f"{n / GiB:8.1f}"


def describe(dims: ParallelDims) -> str:
    return f"dp_replicate={dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp} pp={dims.pp}"


def plan_table(args: ModelArgs, dims: ParallelDims, *, micro_batch: int, seq_len: int, gpu_memory_gib: float,
               pp_schedule: str = "1F1B", pp_microbatches: int = 1) -> list[str]:
    """Lines of a table: one row per activation checkpointing mode, GiB per component and whether it fits."""
    lines = [f"{'activation ckpt':<16}{'params':>9}{'grads':>9}{'optim':>9}{'gathered':>9}{'activ.':>9}"
             f"{'reserve':>9}{'total':>9}  fits {gpu_memory_gib:g} GiB"]
    for mode in AC_MODES:
        e = estimate(args, dims, micro_batch=micro_batch, seq_len=seq_len, ac_mode=mode, pp_schedule=pp_schedule,
                     pp_microbatches=pp_microbatches)
        cells = "".join(f"{format_bytes(v):>9}" for v in (e.params, e.grads, e.optimizer, e.gathered,
                                                           e.activations, e.reserve, e.total))
        lines.append(f"{mode:<16}{cells}  {'yes' if e.total <= gpu_memory_gib * GiB else 'NO'}")
    return lines
