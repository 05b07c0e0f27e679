"""Eager bf16 and int8-weight matrix products computed in fp32, for CPUs without native bf16 arithmetic.

On a CPU without AVX-512 BF16 or AMX, PyTorch's bf16 matrix product falls back to a slow path whose cost grows
with every row: on the 2-core AVX2 machine of docs/generate.md a (200 x 768) by (768 x 2304) product took 49 ms
in bf16 and 5.7 ms in fp32, and the 200-token prefill of ``small`` in bf16 took 2.07 s against 0.46 s in fp32.
``aten._weight_int8pack_mm`` (int8 weights) is fast for a few rows but also grows with each one.

While ``fp32_products(model)`` is active, the model's bf16 ``nn.Linear`` and ``Int8Linear`` layers compute such
products in fp32 (``linear_fp32``): the weight is converted a block of ``BLOCK_ROWS`` rows at a time into a
reused buffer that stays in cache, and multiplied there. Every product of two bf16 values is exact in fp32, and
a bf16 product sums in fp32 as well, so the results differ from the bf16 path only in the order of the sums
(and, for int8 weights, in applying the per-channel scale in fp32). It pays from a few rows on (``MIN_ROWS``):
below that the stock kernels read the weights once and are as fast or faster. The backend applies it to the
prefill (``Backend.products``, from ``Decoder.prefill``; single-token steps keep the stock kernels), and the
eval command and lm-eval model around the batches they score.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from ...hardware import fast_bf16
from ..quantize import Int8Linear, fused_kernel_fits

BLOCK_ROWS = 512  # weight rows converted per block: 1.5 MiB of fp32 at 768 columns
# Fewest input rows for which the fp32 route was faster (2 threads; small's shapes, measured per product):
# bf16 weights: even at 6 rows (1.22 vs 1.27 ms), 2.8x at 16 rows, 7.8x at 200; int8: 2.5x slower at 6 rows,
# even at 16, 2x faster at 200.
MIN_ROWS = {torch.bfloat16: 8, torch.int8: 32}
# From this many rows on, the output is built row-major: scoring 64 requests of 60 + 12 tokens in bf16 was
# 1.12x (small) to 1.23x (stories15m) faster, as the log-softmax over a transposed 32000-wide output was 3x
# slower; 40- and 200-token prefills were 4-7% slower that way.
ROW_MAJOR_ROWS = 256


@functools.cache
def slow_bf16_cpu() -> bool:
    """Whether bf16 matrix products on this CPU are no faster than fp32 ones (measured once per process)."""
    return not fast_bf16(torch.device("cpu"))


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` (times per-row ``scales``) computed in fp32, returned in ``x``'s dtype.

    Below ``ROW_MAJOR_ROWS`` input rows the output is built transposed, each block of weight rows times the
    input writing contiguous memory (MKL's faster order for few rows here); from there on it is built
    row-major, so that what reads it whole (the evaluation's log-softmax over the vocabulary) reads it in
    order.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    row_major = flat.shape[0] >= ROW_MAJOR_ROWS
    out = torch.empty(*((flat.shape[0], weight.shape[0]) if row_major else (weight.shape[0], flat.shape[0])),
                      device=x.device)
    block = torch.empty(min(BLOCK_ROWS, weight.shape[0]), weight.shape[1], device=x.device)
    for start in range(0, weight.shape[0], BLOCK_ROWS):
        rows = weight[start:start + BLOCK_ROWS]
        converted = block[: rows.shape[0]]
        converted.copy_(rows)
        if row_major:
            out[:, start:start + BLOCK_ROWS] = torch.mm(flat, converted.t())
        else:
            torch.mm(converted, flat.t(), out=out[start:start + BLOCK_ROWS])
    out = out if row_major else out.t()
    if scales is not None:
        out *= scales.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp32_products(model: nn.Module, rows: int | None = None) -> contextlib.AbstractContextManager:
    """A context in which the bf16 and int8 linear layers of ``model`` on a CPU without fast bf16 compute inputs
    of ``MIN_ROWS`` rows or more with ``linear_fp32``; a null context where no layer would (``rows``: the rows
    the caller will feed, None if unknown)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear)) and m.weight.device.type == "cpu"
              and m.weight.dtype in MIN_ROWS and getattr(m, "bias", None) is None]
    if any(rows is None or rows >= MIN_ROWS[m.weight.dtype] for m in layers) and slow_bf16_cpu():
        return _fp32_forwards(layers)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fp32_forwards(layers: list[nn.Module]):
    """Each layer's ``forward`` shadowed by an instance attribute, removed on exit (layers already shadowed, by
    an enclosing context, are left to it).

    Only the linear layers are touched: a ``TorchFunctionMode`` that picked the same products out of every
    operation cost 5-10 ms per prefill (1.13-1.28x slower ``stories15m`` bf16 and int8 prefills, measured).
    """
    mine = [layer for layer in layers if "forward" not in layer.__dict__]
    for layer in mine:
        layer.forward = functools.partial(_fp32_forward, layer, type(layer).forward.__get__(layer))
    try:
        yield
    finally:
        for layer in mine:
            del layer.forward


def _fp32_forward(layer: nn.Module, stock, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():  # inference only: the blocked product writes into buffers autograd can't track
        return stock(x)
    flat_rows = _rows(x)
    if isinstance(layer, Int8Linear):  # the fused int8 kernel is the quick one up to a few dozen rows
        fused = fused_kernel_fits(layer.weight, x.reshape(-1, x.shape[-1]))
        if flat_rows >= MIN_ROWS[torch.int8 if fused else torch.bfloat16]:
            return linear_fp32(x, layer.weight, layer.scales)
    elif flat_rows >= MIN_ROWS[torch.bfloat16]:
        return linear_fp32(x, layer.weight)
    return stock(x)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])
