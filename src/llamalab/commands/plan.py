"""``llamalab plan CONFIG --gpus N --gpu-memory GB``: will this training config fit, and with which layout?

CONFIG is a training TOML (its ``[model]``, ``[batch] micro_batch``, ``[data] seq_len``, ``[parallel]``) or a
model preset name (then one sequence of the preset's ``max_seq_len`` per GPU, the paper's setting). The
layout comes from ``--dp-replicate/--dp-shard/--tp/--pp``, else the config's ``[parallel]`` section when it
uses exactly N GPUs, else FSDP over all N. ``--search`` lists the layouts that fit instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..model.args import get_preset
from ..parallel.mesh import LayoutError, ParallelDims
from ..parallel.pipeline import schedule_class
from ..parallel.plan import AC_MODES, GiB, candidate_layouts, describe, estimate, plan_table


def _load(spec: str, overrides: list[str]):
    """(ModelArgs, micro_batch, seq_len, parallel section or None, pp_schedule, pp_microbatches)."""
    if Path(spec).is_file():
        from ..config import load_config

        cfg = load_config(spec, overrides)
        args = cfg.model_args()
        seq_len = cfg.data.seq_len or args.max_seq_len
        p = cfg.parallel
        return args, cfg.batch.micro_batch, seq_len, p, p.pp_schedule, p.pp_microbatches
    if spec.endswith(".toml"):
        raise FileNotFoundError(f"{spec}: no such config file")
    args = get_preset(spec).args
    return args, 1, args.max_seq_len, None, "1F1B", 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="llamalab plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="training config TOML, or a model preset name (llama-7b, ...)")
    ap.add_argument("--gpus", type=int, required=True, help="total number of GPUs (world size)")
    ap.add_argument("--gpu-memory", type=float, required=True, help="memory per GPU in GiB (80 for A100-80GB)")
    ap.add_argument("--dp-replicate", type=int)
    ap.add_argument("--dp-shard", type=int)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--micro-batch", type=int, help="sequences per forward/backward on one rank")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--pp-schedule", help="GPipe, 1F1B, Interleaved1F1B or LoopedBFS")
    ap.add_argument("--pp-microbatches", type=int)
    ap.add_argument("--search", action="store_true", help="list every TP/PP/FSDP layout that fits")
    ap.add_argument("overrides", nargs="*", help="config overrides such as --batch.micro_batch=4 (after --)")
    ns = ap.parse_args(argv)
    args, micro_batch, seq_len, parallel, schedule, microbatches = _load(ns.config, ns.overrides)
    micro_batch = ns.micro_batch or micro_batch
    seq_len = ns.seq_len or seq_len
    schedule = ns.pp_schedule or schedule
    schedule_class(schedule)  # an unknown name is a LayoutError naming the choices
    microbatches = ns.pp_microbatches or microbatches
    if ns.gpus < 1 or ns.gpu_memory <= 0:
        raise LayoutError(f"--gpus must be >= 1 and --gpu-memory > 0, got {ns.gpus} and {ns.gpu_memory:g}")

    print(f"model: {args.num_params() / 1e9:.2f}B parameters (dim {args.dim}, {args.n_layers} layers, "
          f"{args.n_heads} heads, vocab {args.vocab_size}); {micro_batch} x {seq_len} tokens per rank and step")
    if ns.search:
        rows = []
        for dims in candidate_layouts(ns.gpus, args):
            mb = max(micro_batch, dims.pp) if dims.pp > 1 else micro_batch
            mbs = max(microbatches, dims.pp) if dims.pp > 1 else 1
            for mode in AC_MODES:
                e = estimate(args, dims, micro_batch=mb, seq_len=seq_len, ac_mode=mode, pp_schedule=schedule,
                             pp_microbatches=mbs)
                if e.total <= ns.gpu_memory * GiB:
                    rows.append((dims.tp * dims.pp, AC_MODES.index(mode), describe(dims), mode, e.total / GiB))
                    break
        if not rows:
            print(f"no layout fits {ns.gpus} GPUs of {ns.gpu_memory:g} GiB; use more GPUs or a smaller micro-batch")
            return 1
        print(f"layouts that fit {ns.gpus} x {ns.gpu_memory:g} GiB (least model parallelism and recomputation first):")
        for _, _, layout, mode, total in sorted(rows):
            print(f"  {layout:<44} activation ckpt {mode:<9} {total:7.1f} GiB")
        return 0

    if any(v is not None for v in (ns.dp_replicate, ns.dp_shard, ns.tp, ns.pp)):
        dims = ParallelDims(dp_replicate=ns.dp_replicate or 1, dp_shard=ns.dp_shard or -1, tp=ns.tp or 1,
                            pp=ns.pp or 1, world_size=ns.gpus)
    elif parallel is not None and (parallel.dp_replicate * parallel.dp_shard * parallel.tp * parallel.pp
                                   == ns.gpus):
        dims = ParallelDims.from_config(parallel, ns.gpus)
    else:
        dims = ParallelDims(dp_shard=-1, world_size=ns.gpus)
    dims.validate_model(args)
    print(f"layout: {describe(dims)}" + (f", {schedule} with {microbatches} micro-batches" if dims.pp > 1 else ""))
    print("GiB per GPU:")
    for line in plan_table(args, dims, micro_batch=micro_batch, seq_len=seq_len, gpu_memory_gib=ns.gpu_memory,
                           pp_schedule=schedule, pp_microbatches=microbatches):
        print("  " + line)
    return 0
