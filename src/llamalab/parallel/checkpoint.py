"""Distributed checkpoints across layouts: one set of parameter names whatever the layout.

``torch.distributed.checkpoint`` (DCP) stores every tensor under its fully qualified name with its global shape,
so a checkpoint saved under one layout (FSDP, TP, PP, any degrees) loads under any other, including one
process. The only thing layouts must agree on is the names: ``state_module`` gives a pipeline rank's stages
one module whose names are the plain model's (``layers.N...``).
"""

from __future__ import annotations

from torch import nn


def state_module(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's model parts, with the plain model's parameter names.

    Without pipeline parallelism that is the model itself. With it, the stages' blocks and ends are registered
    (not copied) under one parent, so ``get_state_dict``/``set_state_dict`` and a single optimizer see
    ``tok_embeddings.weight``, ``layers.7.attention.wq.weight``, ``output.weight`` as in the full model.
    """
    if len(parts) == 1:
        return parts[0]
    view = nn.Module()
    view.layers = nn.ModuleDict()
    for part in parts:
        for name, block in part.layers.items():
            view.layers[name] = block
        for name in ("tok_embeddings", "norm", "output"):
            if getattr(part, name, None) is not None:
                setattr(view, name, getattr(part, name))
    return view
