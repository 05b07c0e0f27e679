"""Shared by the tests and the torchrun worker: a tiny model, deterministic global batches, and a few training
steps under a given layout that report losses and full (unsharded) parameters and gradients."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llamalab.model import ModelArgs, build_model
from llamalab.parallel.mesh import ParallelDims
from llamalab.parallel.runtime import ParallelRun

ARGS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, norm_eps=1e-5,
            max_seq_len=64)
GLOBAL_BATCH, SEQ_LEN, SEED = 4, 32, 1234


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, ARGS["vocab_size"], (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def make_optimizer(params, name: str):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().clone()


def run_layout(layout: dict, *, steps: int, optim: str = "sgd", mixed_precision: str | None = None,
               start_step: int = 0, load_from: str | None = None, save_to: str | None = None,
               init_seed: int = SEED) -> dict:
    """Train ``steps`` steps under ``layout`` (keys of ParallelDims plus ``schedule``, ``microbatches``, ``ac``,
    ``compile`` and ``meta``: build on the meta device and fill from rank 0) through ``ParallelRun``; with no
    process group it is the one-process reference. Returns losses, full params and last gradients."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if layout.get("meta"):
        model = build_model(ModelArgs(**ARGS), device="meta", init=False)
    else:
        model = build_model(ModelArgs(**ARGS), seed=init_seed)
    dims = ParallelDims(**{k: layout.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "pp")},
                        world_size=world)
    mesh = dims.build_mesh("cpu") if world > 1 else None
    run = ParallelRun.setup(model, dims, mesh, device=torch.device("cpu"), loss_fn=loss_fn,
                            ac_mode=layout.get("ac", "none"), compile=layout.get("compile", False),
                            precision=mixed_precision or "fp32", pp_schedule=layout.get("schedule", "1F1B"),
                            pp_microbatches=layout.get("microbatches", 2), seed=init_seed)
    optimizer = make_optimizer(run.module.parameters(), optim)
    if load_from is not None:
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(run.module, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=load_from)
        set_state_dict(run.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    losses = []
    for step in range(start_step, start_step + steps):
        local = global_batch(step).chunk(dims.dp)[dims.dp_rank()]
        optimizer.zero_grad()
        losses.append(run.mean_over_ranks(run.forward_backward(local)).item())
        optimizer.step()
    if save_to is not None:
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(run.module, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=save_to)
    params = {n: _full(p) for n, p in run.module.named_parameters()}
    grads = {n: _full(p.grad) for n, p in run.module.named_parameters()}
    del run, model, optimizer
    gc.collect()
    return {"losses": losses, "params": params, "grads": grads}


def reference_bf16(*, steps: int, optim: str = "sgd") -> dict:
    """One process emulating FSDP2's bf16 policy: bf16 compute copy, fp32 gradients and master weights."""
    master = build_model(ModelArgs(**ARGS), seed=SEED)
    work = build_model(ModelArgs(**ARGS), init=False, dtype=torch.bfloat16)
    optimizer = make_optimizer(master.parameters(), optim)
    losses = []
    for step in range(steps):
        batch = global_batch(step)
        with torch.no_grad():
            for w, m in zip(work.parameters(), master.parameters()):
                w.copy_(m)
        work.zero_grad()
        loss = loss_fn(work(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        for w, m in zip(work.parameters(), master.parameters()):
            m.grad = w.grad.float()
        losses.append(loss.item())
        optimizer.step()
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in master.named_parameters()},
            "grads": {n: p.grad.clone() for n, p in master.named_parameters()}}
