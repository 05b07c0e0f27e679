"""LoRA (Hu et al., 2021): frozen weights plus trainable low-rank updates, initialised and named as PEFT does.

``apply_lora`` replaces each target ``nn.Linear`` (by Meta's name: ``wq wk wv wo w1 w2 w3 output``) with a
``LoRALinear`` that keeps the original ``weight`` under its own name and adds ``lora_A`` (rank x in) and
``lora_B`` (out x rank) beside it, so a LoRA model's parameters read ``layers.0.attention.wq.weight`` (frozen)
and ``layers.0.attention.wq.lora_A.weight`` (trained). A is drawn as ``nn.Linear`` and PEFT draw it
(Kaiming-uniform, a = sqrt(5)) and B is zero, so the model computes exactly what the base does at step 0.
Every other parameter is frozen too: the optimizer (``param_groups`` skips frozen tensors) holds the adapters'
state only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_MARK = ".lora_"  # in every adapter parameter's name


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """alpha / rank (LoRA), or alpha / sqrt(rank) (rsLoRA, Kalajdzievski 2023: stable as the rank grows)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRALinear(nn.Module):
    """``W x + scaling * B(A(dropout(x)))`` with ``W`` frozen (in the base's dtype) and A, B in fp32."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        kwargs = {"bias": False, "device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.in_features, rank, **kwargs)
        self.lora_B = nn.Linear(rank, self.out_features, **kwargs)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's reset_lora_parameters
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        update = self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))) * self.scaling
        return out + update.to(out.dtype)  # a bf16 base keeps bf16 activations (attention wants one dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.out_features}"


def apply_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
               rslora: bool = False) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose own name is in ``targets``; returns their names."""
    for param in model.parameters():
        param.requires_grad_(False)
    scaling = lora_scaling(rank, alpha, rslora)
    wrapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent_name), leaf, LoRALinear(module, rank, scaling, dropout))
            wrapped.append(name)
    return wrapped


def split_adapters(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, adapter tensors) of a LoRA model's state dict."""
    adapters = {k: v for k, v in state.items() if ADAPTER_MARK in k}
    return {k: v for k, v in state.items() if k not in adapters}, adapters


@torch.no_grad()
def merge_adapters(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                   scaling: float) -> dict[str, torch.Tensor]:
    """``state`` (Meta names) with each adapter pair folded into its weight: W + scaling * B @ A, computed in
    fp32 and stored in W's dtype."""
    merged = dict(state)
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        weight, b = state.get(f"{module}.weight"), adapters.get(f"{module}.lora_B.weight")
        a = adapters[key]
        if weight is None or b is None or (b.shape[0], a.shape[1]) != weight.shape or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{None if b is None else tuple(b.shape)} do not fit the base model's "
                             f"{None if weight is None else tuple(weight.shape)} weight")
        a, b = a.float(), b.float()
        merged[f"{module}.weight"] = (weight.float() + scaling * (b @ a)).to(weight.dtype)
    return merged


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
