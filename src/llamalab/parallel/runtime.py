"""What the training loop needs from a parallel layout, behind one object that also covers one process.

``ParallelRun.setup(model, ...)`` applies the ``[parallel]`` layout to a fully initialised model and gives the
loop: ``module`` (one module with the plain model's names, for the optimizer, checkpoints and clipping),
``forward_backward`` (plain, tensor-parallel with the vocabulary-parallel loss, or a pipeline schedule),
``eval_loss_sum``, ``clip_grad_norm`` (global over pipeline stages too) and ``mean_over_ranks``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import state_module
from .mesh import ParallelDims
from .parallelize import loss_parallel_context, parallelize_model
from .pipeline import IGNORE_INDEX, Pipeline, build_pipeline, loss_share

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets): a (B, T+1) token tensor is shifted by one; an (inputs, targets) pair, whose targets may
    hold ``IGNORE_INDEX``, is already split (instruction data masks its prompts)."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:]
    return batch


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class ParallelRun:
    dims: ParallelDims
    parts: list[nn.Module]
    module: nn.Module
    loss_fn: LossFn
    autocast: Callable[[], contextlib.AbstractContextManager]
    pipeline: Pipeline | None = None
    mesh: object | None = None

    @classmethod
    def setup(cls, model: nn.Module, dims: ParallelDims, mesh, *, device: torch.device, loss_fn: LossFn,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              ac_mode: str = "none", compile: bool = False, precision: str = "fp32",
              pp_schedule: str = "1F1B", pp_microbatches: int = 1, seed: int | None = None) -> ParallelRun:
        """Parallelize ``model`` for ``dims`` on ``mesh``.

        ``model`` is either initialised identically on every rank, or built on the meta device (shapes only):
        then it is parallelized first and given rank 0's weights for ``seed`` afterwards (``materialize``),
        so no rank ever holds more than its shards on the accelerator.
        """
        if mesh is None:  # one process: nothing to distribute, the same activation checkpointing and compile
            model = parallelize_model(model, None, dims, ac_mode=ac_mode, compile=compile)
            return cls(dims=dims, parts=[model], module=model, loss_fn=loss_fn, autocast=autocast)
        dims.validate_model(model.args)
        on_meta = any(p.is_meta for p in model.parameters())

        def parallelize(m: nn.Module) -> nn.Module:
            return parallelize_model(m, mesh, dims, ac_mode=ac_mode, compile=compile,
                                     mixed_precision=precision if dims.fsdp_enabled else None)

        pipeline = None
        if dims.pp_enabled:
            microbatches = max(pp_microbatches, dims.pp)  # fewer micro-batches than stages only idles them
            pipeline = build_pipeline(model, mesh["pp"], schedule=pp_schedule, microbatches=microbatches,
                                      loss_fn=loss_fn, device=device, parallelize=parallelize)
            parts = pipeline.parts
        else:
            parts = [parallelize(model)]
        run = cls(dims=dims, parts=parts, module=state_module(parts), loss_fn=loss_fn, autocast=autocast,
                  pipeline=pipeline, mesh=mesh)
        if on_meta:
            run.materialize(model.args, seed, device)
        return run

    def materialize(self, args, seed: int | None, device: torch.device) -> None:
        """Storage for a model parallelized on the meta device, filled with the weights one process would
        initialise with ``seed``: rank 0 builds the full model on the CPU (fp32, once) and broadcasts it tensor by
        tensor; each rank keeps its own shards. Random init directly on shards would repeat one rank's numbers
        on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from ..model import build_model

        for part in self.parts:
            part.to_empty(device=device)
        full = build_model(args, device="cpu", seed=seed).state_dict() if dist.get_rank() == 0 else {}
        # not strict: rank 0 also holds (and broadcasts) the other pipeline stages' tensors
        set_model_state_dict(self.module, full, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))
        del full
        for part in self.parts:
            part.init_buffers()  # the rotary tables are not in the state dict

    def loss_tokens(self, batches: list[Batch]) -> float:
        """The targets not ignored in one optimizer step's micro-batches ``batches``, counted over every
        data-parallel rank and divided by their number: what ``forward_backward`` divides the summed loss by, so
        that the data-parallel mean of the accumulated gradients is that of the mean over all the global batch's
        targets, as one process computes it on the whole batch, however many of them each micro-batch, pipeline
        micro-batch or rank holds (instruction data: a mean of micro-batch means would weigh tokens unequally)."""
        count = sum((split_batch(b)[1] != IGNORE_INDEX).sum() for b in batches)
        return float(self.mean_over_ranks(count.double()))  # equal within each TP/PP group: the same rows

    def forward_backward(self, batch: Batch, tokens: float | None = None) -> torch.Tensor:
        """Loss of one micro-batch (``split_batch`` gives its inputs and targets) summed over its targets not
        ignored and divided by ``tokens`` (``loss_tokens`` of the step; default: this micro-batch's count, i.e.
        its mean); accumulates its gradients. Returns it detached as a plain fp32 tensor, the same on every rank
        of a tensor- or pipeline-parallel group."""
        inputs, targets = split_batch(batch)
        if tokens is None:
            tokens = float((targets != IGNORE_INDEX).sum())
        with loss_parallel_context(self.dims):
            if self.pipeline is not None:
                with self.autocast():
                    return self.pipeline.step(inputs, targets, tokens)
            with self.autocast():
                logits = self.parts[0](inputs)
            loss = loss_share(self.loss_fn(logits, targets), targets, tokens)
            loss.backward()
        return _plain(loss.detach()).float()

    @torch.no_grad()
    def eval_loss_sum(self, batch: Batch) -> tuple[float, int]:
        """(summed loss, count of targets not ignored) of a held-out batch; (0, 0) on ranks that hold no loss
        (pipeline)."""
        inputs, targets = split_batch(batch)
        count = int((targets != IGNORE_INDEX).sum())
        with loss_parallel_context(self.dims):
            if self.pipeline is not None:
                with self.autocast():
                    loss_sum = self.pipeline.step(inputs, targets, 1.0, train=False)  # the same on every stage
                # count the tokens once per data-parallel group: on the last stage only
                if not self.pipeline.has_last:
                    return 0.0, 0
                return loss_sum.item(), count
            with self.autocast():
                logits = self.parts[0](inputs)
            if not self.dims.tp_enabled:  # the exact sum (the vocabulary-parallel loss only gives a mean)
                loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
                return _plain(loss_sum).item(), count
            loss = self.loss_fn(logits, targets)
        return _plain(loss).float().item() * count, count

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients (over shards, tensor slices and pipeline stages), clipped to
        ``max_norm`` when it is > 0; returns the norm before clipping as a plain tensor."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.pipeline is None:  # torch's own clipping handles DTensor gradients on one mesh
            if max_norm > 0:
                return _plain(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            return _plain(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))
        norm = _plain(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)).float()
        squared = norm**2
        dist.all_reduce(squared, group=self.pipeline.group)  # each stage holds only its own parameters
        norm = squared.sqrt()
        if max_norm > 0 and math.isfinite(norm.item()):
            coef = min(1.0, max_norm / (norm.item() + 1e-6))
            for p in params:
                p.grad.mul_(coef)
        return norm

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks of a value already equal within each TP/PP group (gloo has no
        AVG: sum over all ranks and divide)."""
        if not dist.is_initialized():
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()
