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
from torch import nn

from .checkpoint import state_module
from .mesh import ParallelDims
from .parallelize import loss_parallel_context, parallelize_model
from .pipeline import Pipeline, build_pipeline

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    pipeline_loss_scale: dict | None = None  # the schedule calls loss_fn itself: gradient accumulation scales it

    @classmethod
    def setup(cls, model: nn.Module, dims: ParallelDims, mesh, *, device: torch.device, loss_fn: LossFn,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              ac_mode: str = "none", compile: bool = False, precision: str = "fp32",
              pp_schedule: str = "1F1B", pp_microbatches: int = 1) -> ParallelRun:
        """Parallelize ``model`` (initialised identically on every rank) for ``dims`` on ``mesh``."""
        if mesh is None:  # one process: nothing to distribute
            return cls(dims=dims, parts=[model], module=model, loss_fn=loss_fn, autocast=autocast)
        dims.validate_model(model.args)

        def parallelize(m: nn.Module) -> nn.Module:
            return parallelize_model(m, mesh, dims, ac_mode=ac_mode, compile=compile,
                                     mixed_precision=precision if dims.fsdp_enabled else None)

        pipeline, scale = None, {"value": 1.0}
        if dims.pp_enabled:
            microbatches = max(pp_microbatches, dims.pp)  # fewer micro-batches than stages only idles them

            def scaled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                return loss_fn(logits, targets) * scale["value"]

            pipeline = build_pipeline(model, mesh["pp"], schedule=pp_schedule, microbatches=microbatches,
                                      loss_fn=scaled_loss, device=device, parallelize=parallelize)
            parts = pipeline.parts
        else:
            parts = [parallelize(model)]
        return cls(dims=dims, parts=parts, module=state_module(parts), loss_fn=loss_fn, autocast=autocast,
                   pipeline=pipeline, mesh=mesh, pipeline_loss_scale=scale)

    def forward_backward(self, batch: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Loss of one micro-batch (``batch`` holds inputs and shifted targets); gradients of ``scale * loss``
        are accumulated. Returns the detached mean loss as a plain tensor, the same on every rank of a
        tensor- or pipeline-parallel group."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with loss_parallel_context(self.dims), self.autocast():
            if self.pipeline is not None:
                self.pipeline_loss_scale["value"] = scale
                return self.pipeline.step(inputs, targets) / scale
            loss = self.loss_fn(self.parts[0](inputs), targets)
            (loss * scale).backward()
        return _plain(loss.detach()).float()

    @torch.no_grad()
    def eval_loss_sum(self, batch: torch.Tensor) -> tuple[float, int]:
        """(summed loss, token count) of a held-out batch; (0, 0) on ranks that hold no loss (pipeline)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with loss_parallel_context(self.dims), self.autocast():
            if self.pipeline is not None:
                losses: list[torch.Tensor] = []
                p = self.pipeline
                self.pipeline_loss_scale["value"] = 1.0
                if p.has_first:
                    p.schedule.eval(inputs, target=targets if p.has_last else None, losses=losses)
                elif p.has_last:
                    p.schedule.eval(target=targets, losses=losses)
                else:
                    p.schedule.eval()
                if not p.has_last:
                    return 0.0, 0
                mean = torch.stack([_plain(x).float() for x in losses]).mean().item()
                return mean * targets.numel(), targets.numel()
            loss = self.loss_fn(self.parts[0](inputs), targets)
        return _plain(loss).float().item() * targets.numel(), targets.numel()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients (over shards, tensor slices and pipeline stages), clipped to
        ``max_norm`` when it is > 0; returns the norm before clipping as a plain tensor."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = _plain(torch.nn.utils.get_total_norm(grads, foreach=True)) if grads else torch.zeros(())
        if self.pipeline is not None:
            squared = norm.float() ** 2
            dist.all_reduce(squared, group=self.pipeline.group)
            norm = squared.sqrt()
        if max_norm > 0 and math.isfinite(norm.item()):
            coef = min(1.0, max_norm / (norm.item() + 1e-6))
            for g in grads:
                g.mul_(coef)
        return norm

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks of a value already equal within each TP/PP group (gloo has no
        AVG: sum over all ranks and divide)."""
        if not dist.is_initialized():
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()
