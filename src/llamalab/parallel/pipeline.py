"""Pipeline parallelism with ``torch.distributed.pipelining``: split the blocks into stages, run a schedule.

Each stage is a copy of the ``Transformer`` that keeps only its blocks (``layers`` is a ModuleDict keyed by the
layer number, so parameter names stay Meta's) and sets ``tok_embeddings`` / ``norm`` / ``output`` to None where
another stage owns them; the model's forward passes hidden states through when they are None. Looped schedules
(``Interleaved1F1B``, ``LoopedBFS``) give each rank two stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from ..data.loader import IGNORE_INDEX
from .mesh import LayoutError

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS")


def loss_share(loss: torch.Tensor, targets: torch.Tensor, tokens: float) -> torch.Tensor:
    """``loss``, the mean over the targets of ``targets`` not ignored, as its part of a sum over ``tokens``
    targets: summed loss / ``tokens``. Micro-batches that take loss on different numbers of tokens then weigh
    each token alike, as one mean over the whole batch does (a mean of micro-batch means would not). One with no
    target to take loss on (its mean is NaN) adds 0, and still runs backward like the others."""
    count = int((targets != IGNORE_INDEX).sum())
    if count == 0:
        return torch.nan_to_num(loss, nan=0.0) * 0.0
    return loss * (count / tokens)


def schedule_class(name: str):
    """The schedule class for a ``[parallel] pp_schedule`` name (case-insensitive), or a clear error."""
    by_lower = {s.lower(): s for s in SCHEDULES}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise LayoutError(f"parallel.pp_schedule must be one of {list(SCHEDULES)}, got {name!r}")
    return get_schedule_class(by_lower[name.lower()])


def stages_per_rank(schedule: str) -> int:
    return 1 if issubclass(schedule_class(schedule), PipelineScheduleSingle) else 2


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous, as even as possible; the first stages take one extra block when it does not divide
    (the last stage also carries the output layer and the loss)."""
    if n_stages > n_layers:
        raise LayoutError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {n_layers}")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        bounds.append(range(start, start + size))
        start += size
    return bounds


def stage_module(model: nn.Module, layer_ids: range, first: bool, last: bool) -> nn.Module:
    """Strip ``model`` (in place) down to one stage: its blocks, and the embedding/head only at the ends."""
    for name in list(model.layers.keys()):
        if int(name) not in layer_ids:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


@dataclass
class Pipeline:
    schedule: object
    parts: list[nn.Module]  # this rank's stage modules, in stage order
    stage_ids: list[int]
    num_stages: int
    group: dist.ProcessGroup
    microbatches: int
    tokens: float = 1.0  # what the schedule's summed loss is divided by before its backward (``loss_share``)

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, tokens: float, train: bool = True) -> torch.Tensor:
        """Forward (and backward) over the whole local batch; returns its loss summed over the targets not
        ignored, divided by ``tokens``, on every rank.

        Gradients of that are added to what the parameters already hold, so calls with the same ``tokens``
        (the step's count) accumulate like one larger batch. (The schedule's own ``scale_grads`` would divide
        the earlier calls' gradients again, so the averaging is done in the loss instead.)
        """
        self.tokens = tokens
        run = self.schedule.step if train else self.schedule.eval
        losses: list[torch.Tensor] = []
        if self.has_first:
            run(inputs, target=targets if self.has_last else None, losses=losses)
        elif self.has_last:
            run(target=targets, losses=losses)
        else:
            run()
        if self.has_last:
            loss = torch.stack([_plain(loss).detach() for loss in losses]).sum().float()
        else:
            loss = torch.zeros((), device=inputs.device)
        dist.all_reduce(loss, group=self.group)  # only the last stage contributes
        return loss


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def build_pipeline(model: nn.Module, pp_mesh: DeviceMesh, *, schedule: str, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   parallelize: Callable[[nn.Module], nn.Module] | None = None) -> Pipeline:
    """Split a full ``Transformer`` into this rank's stages, parallelize each and build the schedule.

    ``parallelize`` is applied to each stage module (TP/AC/compile/FSDP: ``parallelize_model`` with the same
    mesh). ``loss_fn(logits, targets)`` must average over its micro-batch's targets not ignored (each pipeline
    micro-batch's mean then enters as ``loss_share``). ``model`` itself becomes one of the
    parts; further stages on the same rank are deep copies taken before stripping.
    """
    cls = schedule_class(schedule)
    pipeline: Pipeline | None = None

    def scaled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_share(loss_fn(logits, targets), targets, pipeline.tokens)

    per_rank = stages_per_rank(schedule)
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    num_stages = pp_size * per_rank
    if microbatches < 1:
        raise LayoutError(f"parallel.pp_microbatches must be >= 1, got {microbatches}")
    bounds = split_layers(len(model.layers), num_stages)
    stage_ids = [pp_rank + k * pp_size for k in range(per_rank)]  # looped assignment
    copies = [copy.deepcopy(model) for _ in stage_ids[1:]] + [model]
    parts, stages = [], []
    group = pp_mesh.get_group()
    for sid, part in zip(stage_ids, copies):
        part = stage_module(part, bounds[sid], first=sid == 0, last=sid == num_stages - 1)
        if parallelize is not None:
            part = parallelize(part)
        parts.append(part)
        stages.append(PipelineStage(part, sid, num_stages, device, group=group))
    sched = cls(stages[0] if per_rank == 1 else stages, n_microbatches=microbatches, loss_fn=scaled_loss,
                scale_grads=False)
    pipeline = Pipeline(schedule=sched, parts=parts, stage_ids=stage_ids, num_stages=num_stages, group=group,
                        microbatches=microbatches)
    return pipeline
