"""Eager bf16 and int8-weight matrix products computed in fp32, for CPUs without native bf16 arithmetic.

On a CPU without AVX-512 BF16 or AMX, PyTorch's bf16 matrix product falls back to a slow path whose cost grows
with every row: on the 2-core AVX2 machine of docs/generate.md a (200 x 768) by (768 x 2304) product took 49 ms
in bf16 and 5.7 ms in fp32, and the 200-token prefill of ``small`` in bf16 took 2.07 s against 0.46 s in fp32.
``aten._weight_int8pack_mm`` (int8 weights) is fast for a few rows but also grows with each one.

``Fp32Products`` reroutes those products, while it is active, to fp32: the weight is converted a block of
``BLOCK_ROWS`` rows at a time into a reused buffer that stays in cache, and multiplied there. Every product of
two bf16 values is exact in fp32, and a bf16 product sums in fp32 as well, so the results differ from the bf16
path only in the order of the sums (and, for int8 weights, in where the per-channel scale is applied). It pays
from a few rows on (``MIN_ROWS``): below that the stock kernels read the weights once and are as fast or faster.
Generation uses it for the prefill (``Decoder.prefill``; single-token steps keep the stock kernels), and the
evaluation harness for every batch it scores (``llamalab.eval.harness.Scorer``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..train.metrics import fast_bf16
from .quantize import Int8Linear

BLOCK_ROWS = 512  # weight rows converted per block: 1.5 MiB of fp32 at 768 columns
# Fewest input rows for which the fp32 route was faster (2 threads; small's shapes, measured per product):
# bf16 weights: even at 6 rows (1.22 vs 1.27 ms), 2.8x at 16 rows, 7.8x at 200; int8: 2.5x slower at 6 rows,
# even at 16, 2x faster at 200.
MIN_ROWS = {torch.bfloat16: 8, torch.int8: 32}


@functools.cache
def slow_bf16_cpu() -> bool:
    """Whether bf16 matrix products on this CPU are no faster than fp32 ones (measured once per process)."""
    return not fast_bf16(torch.device("cpu"))


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` (times per-row ``scales``) computed in fp32, returned in ``x``'s dtype.

    The output is built transposed, one block of weight rows at a time, so each block's product writes
    contiguous memory.
    """
    flat = x.reshape(-1, x.shape[-1]).float()
    out_t = torch.empty(weight.shape[0], flat.shape[0], device=x.device)
    block = torch.empty(min(BLOCK_ROWS, weight.shape[0]), weight.shape[1], device=x.device)
    for start in range(0, weight.shape[0], BLOCK_ROWS):
        rows = weight[start:start + BLOCK_ROWS]
        converted = block[: rows.shape[0]]
        converted.copy_(rows)
        torch.mm(converted, flat.t(), out=out_t[start:start + BLOCK_ROWS])
    if scales is not None:
        out_t *= scales.float()[:, None]
    return out_t.t().to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class Fp32Products(TorchFunctionMode):
    """While active, eager ``F.linear`` with bf16 operands and ``aten._weight_int8pack_mm`` run ``linear_fp32``
    when the input has at least ``MIN_ROWS`` rows; everything else runs unchanged."""

    _INT8_MM = (torch.ops.aten._weight_int8pack_mm, torch.ops.aten._weight_int8pack_mm.default)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and x.dtype == weight.dtype == torch.bfloat16 and _rows(x) >= MIN_ROWS[torch.bfloat16]:
                return linear_fp32(x, weight)
        elif func in self._INT8_MM:
            x, weight, scales = args
            if _rows(x) >= MIN_ROWS[torch.int8]:
                return linear_fp32(x, weight, scales)
        return func(*args, **kwargs)


def fp32_products(model: nn.Module, rows: int | None = None) -> contextlib.AbstractContextManager:
    """``Fp32Products()`` when ``model`` runs on a CPU without fast bf16 and has bf16 or int8 weights that inputs
    of ``rows`` rows (None: of any size) would reroute; else a null context (the mode costs a little on every
    operation)."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))
              and m.weight.device.type == "cpu"}
    if any(rows is None or rows >= MIN_ROWS[d] for d in dtypes & MIN_ROWS.keys()) and slow_bf16_cpu():
        return Fp32Products()
    return contextlib.nullcontext()


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])
