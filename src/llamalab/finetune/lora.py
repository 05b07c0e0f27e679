"""LoRA (Hu et al., 2021): frozen weights plus trainable low-rank updates, initialised and named as PEFT does.

``apply_lora`` replaces each target ``nn.Linear`` (by Meta's name: ``wq wk wv wo w1 w2 w3 output``) with a
``LoRALinear`` that keeps the original ``weight`` under its own name and adds ``lora_A`` (rank x in) and
``lora_B`` (out x rank) beside it, so a LoRA model's parameters read ``layers.0.attention.wq.weight`` (frozen)
and ``layers.0.attention.wq.lora_A.weight`` (trained). A is drawn as ``nn.Linear`` and PEFT draw it
(Kaiming-uniform, a = sqrt(5)) and B is zero, so the model computes exactly what the base does at step 0.
Every other parameter is frozen too: the optimizer (``param_groups`` skips frozen tensors) holds the adapters'
state only.

``quantize_base`` stores the frozen weights of every linear layer (wrapped or not) as int8 with one scale per
output channel, by the inference quantizer (``llamalab.inference.quantize``); the embedding and the norms stay
in the compute dtype. Those int8 tensors are non-persistent buffers: a state dict (and so a checkpoint) holds
the adapters and the unquantized frozen parameters only, and the base is read and quantized again, to the same
bytes, when a run resumes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.quantize import quantize_per_channel

ADAPTER_MARK = ".lora_"  # in every adapter parameter's name


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """alpha / rank (LoRA), or alpha / sqrt(rank) (rsLoRA, Kalajdzievski 2023: stable as the rank grows)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class LoRALinear(nn.Module):
    """``W x + scaling * B(A(dropout(x)))`` with ``W`` frozen (in the base's dtype, or int8 with ``scales`` after
    ``quantize_base``) and A, B in fp32."""

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
        if self.weight.dtype == torch.int8:  # an int8 base (``quantize_base``)
            out = int8_matmul(x, self.weight, self.scales)
        else:
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


class _Int8Matmul(torch.autograd.Function):
    """The product of ``llamalab.inference.quantize.int8_linear``'s unfused branch, ``F.linear(x, q) * scales``
    (the int8 weight widened on the fly), with a backward pass for ``x`` only. Not its fused
    ``aten._weight_int8pack_mm``: that kernel has no derivative and is a decoding kernel (measured on this CPU,
    2048 x 768 weight, 1024 rows: 5.3 s fp32 and 312 ms bf16 against 159 ms and 32 ms unfused). Only the int8
    weight and the scales are saved for the backward pass; no widened copy outlives a call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scales)
        ctx.x_dtype = x.dtype
        # not in place: selective activation checkpointing may keep the product's output (w1, w3)
        return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scales = ctx.saved_tensors  # W = diag(scales) q: dL/dx = grad @ W, W widened for this product only
        grad_x = grad @ weight.to(grad.dtype).mul_(scales.to(grad.dtype)[:, None])
        return grad_x.to(ctx.x_dtype), None, None


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for a frozen int8 ``weight`` (out, in), differentiable in ``x``.
    Under autocast the product takes autocast's dtype, as ``F.linear`` does."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return _Int8Matmul.apply(x, weight, scales)


class FrozenInt8Linear(nn.Module):
    """A frozen bias-free ``nn.Linear`` of the base stored as int8 (``quantize_per_channel``); gradients flow
    through it to the input, none to the weight. Its tensors are non-persistent buffers (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("an int8 base quantizes bias-free layers only (LLaMA has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scales", scales.to(linear.weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen int8 per-channel"


@torch.no_grad()
def quantize_base(model: nn.Module) -> int:
    """Store the frozen weight of every linear layer of ``model`` (a ``LoRALinear``'s and every plain
    ``nn.Linear``) as int8 with per-output-channel scales, in place, exactly as
    ``llamalab.inference.quantize.quantize_int8`` does (same rounding, scales in the weight's dtype); returns
    how many were quantized. The embedding and the norms are left as they are."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and module.weight.dtype != torch.int8:
            q, scales = quantize_per_channel(module.weight)
            dtype = module.weight.dtype
            del module.weight  # the fp32 (or bf16) parameter goes, and its memory with it
            module.register_buffer("weight", q, persistent=False)
            module.register_buffer("scales", scales.to(dtype), persistent=False)
            count += 1
        elif type(module) is nn.Linear and ADAPTER_MARK not in f".{name}":
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, FrozenInt8Linear(module))
            count += 1
    return count


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
    """(trainable, total) parameter counts; an int8 base's weights (buffers) count in the total."""
    params = list(model.parameters())
    int8 = sum(b.numel() for b in model.buffers() if b.dtype == torch.int8)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + int8
