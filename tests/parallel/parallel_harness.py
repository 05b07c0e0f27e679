"""Shared by the tests and the torchrun worker: a tiny model, deterministic global batches, and a few training
steps under a given layout that report losses and full (unsharded) parameters and gradients."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from llamalab.model import ModelArgs, build_model
from llamalab.parallel.checkpoint import state_module
from llamalab.parallel.mesh import ParallelDims
from llamalab.parallel.parallelize import loss_parallel_context, parallelize_model
from llamalab.parallel.pipeline import build_pipeline

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
    """Train ``steps`` steps under ``layout`` (keys of ParallelDims plus ``schedule``/``microbatches``);
    with no process group it is the one-process reference. Returns losses, params and last gradients."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = build_model(ModelArgs(**ARGS), seed=init_seed)
    dims = ParallelDims(**{k: layout.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "pp")},
                        world_size=world)
    mesh = dims.build_mesh("cpu") if world > 1 else None

    def parallelize(m):
        return parallelize_model(m, mesh, dims, ac_mode=layout.get("ac", "none"), compile=layout.get("compile", False),
                                 mixed_precision=mixed_precision)

    pipeline = None
    if dims.pp_enabled:
        pipeline = build_pipeline(model, mesh["pp"], schedule=layout.get("schedule", "1F1B"),
                                  microbatches=layout.get("microbatches", 2), loss_fn=loss_fn,
                                  device=torch.device("cpu"), parallelize=parallelize)
        parts = pipeline.parts
    else:
        parts = [parallelize(model)]
    view = state_module(parts)
    optimizer = make_optimizer(view.parameters(), optim)
    if load_from is not None:
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(view, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=load_from)
        set_state_dict(view, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    dp_rank, dp = dims.dp_rank(), dims.dp
    losses = []
    for step in range(start_step, start_step + steps):
        batch = global_batch(step)
        local = batch.chunk(dp)[dp_rank]
        inputs, targets = local[:, :-1], local[:, 1:]
        optimizer.zero_grad()
        with loss_parallel_context(dims):
            if pipeline is not None:
                loss = pipeline.step(inputs, targets)
            else:
                loss = loss_fn(parts[0](inputs), targets)
                loss.backward()
        loss = _full(loss)
        if world > 1:
            dist.all_reduce(loss)  # equal on tp/pp peers, so the mean over all ranks is the mean over dp
            loss /= world
        losses.append(loss.item())
        optimizer.step()
    if save_to is not None:
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(view, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=save_to)
    params = {n: _full(p) for n, p in view.named_parameters()}
    grads = {n: _full(p.grad) for n, p in view.named_parameters()}
    del view, parts, model, optimizer, pipeline
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
