"""Int8 weight-only quantization with one scale per output channel (symmetric, round to nearest).

Decoding one token is bound by reading the weights; int8 halves the bytes of bf16 and quarters those of fp32.
Activations stay in the model's dtype: ``aten._weight_int8pack_mm`` multiplies them by the int8 matrix and
applies the per-channel scales, so no dequantized copy of a weight is ever materialised. The token embedding
stays unquantized (decoding reads one row of it per token); every ``nn.Linear``, the output layer
included, is quantized.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scales) with ``weight ~= q * scales[:, None]``, each row scaled by max|row| / 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A bias-free linear layer holding an int8 weight (out, in) and per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear quantizes bias-free layers only (LLaMA has no biases)")
        dtype = linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, dtype=dtype, device=linear.weight.device)
        q, scales = quantize_per_channel(linear.weight)
        module.weight.copy_(q)
        module.scales.copy_(scales.to(dtype))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for an int8 ``weight`` (out, in) and per-row ``scales``."""
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    if fused_kernel_fits(weight, flat):
        out = torch.ops.aten._weight_int8pack_mm(flat, weight, scales.to(x.dtype))
    else:  # dequantize on the fly (inductor folds the conversion into a float weight when frozen)
        out = nn.functional.linear(flat, weight.to(x.dtype)) * scales.to(x.dtype)
    return out.reshape(*x.shape[:-1], out_features)


def fused_kernel_fits(weight: torch.Tensor, flat: torch.Tensor) -> bool:
    """Whether ``aten._weight_int8pack_mm`` is safe here.

    Measured on torch 2.13 CPU: it returns wrong numbers when ``in_features`` is not a multiple of 8
    (stories260K's 172) and crashes on an input that is not 4-byte aligned, so those take the slow path.
    Under compile the input is an inductor buffer, which is always aligned.
    """
    if weight.device.type != "cpu" or weight.shape[1] % 16:
        return False
    return torch.compiler.is_compiling() or (flat.is_contiguous() and flat.data_ptr() % 16 == 0)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an ``Int8Linear``, in place; returns the model.

    A backend built for the model before (``llamalab.inference.backend``) sees the new tensors and rebuilds its
    Decoders."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return model
