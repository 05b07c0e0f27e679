"""How a model runs for inference on this machine, applied from outside the model as ``parallelize_model`` is
for training: ``accelerate(model, compile=...)`` returns a ``Backend`` and logs one line naming what is on and why.

Generation asks the backend for its Decoders (kept per shape, so a compiled step compiles once), for the
compiled step, for the key/value cache's memory and for the prefill's products; the eval command asks it for the
scoring's products. What it applies, each measured in docs/generate.md:

- bf16 and int8-weight products computed in fp32 where the CPU has no native bf16 (``fp32_products``);
- a compiled single-token step (``compiled_step``): frozen weights, GEMMs autotuned against inductor's C++
  template and a C++ wrapper on the CPU, CUDA graphs on a GPU; on the CPU it runs on a view of the model whose
  projections are stacked (``stacked``), and the weights' digest joins inductor's compile cache key
  (``cache_key``);
- llamalab's AVX2 row micro-kernels inside inductor's GEMM template (``row_kernels``), where inductor emits
  AVX2 code; on AVX-512 CPUs inductor keeps its own (AVX-512 and AMX) micro-kernels;
- huge pages under the compiled step's frozen weights and under the key/value cache (``huge_pages``).

Every private torch name these use is looked up, and checked, in ``torch_internals``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import nn

from ...hardware import bf16_support
from . import fp32_products
from .compiled_step import CompiledStep
from .huge_pages import back_with_huge_pages, huge_pages_setting
from .row_kernels import inductor_emits_avx2, inductor_isa
from .stacked import decode_view
from .torch_internals import internals

__all__ = ["Backend", "accelerate"]

log = logging.getLogger(__name__)
Kept = TypeVar("Kept")


def accelerate(model: nn.Module, *, compile: bool = False) -> Backend:
    """The inference backend for ``model`` as it is (device, dtype, int8 layers); ``compile`` compiles the
    single-token decode step. Logs which optimisations are on. Keep the result: it holds the compiled steps."""
    backend = Backend(model, compile=compile)
    log.info(backend.describe())
    return backend


class Backend:
    """One model's way of running on its device, and the Decoders built for it (``kept``).

    A compiling backend checks at once that every private torch name it needs is there (``torch_internals``).
    """

    def __init__(self, model: nn.Module, *, compile: bool = False):
        self.model, self.compile = model, compile
        self.device = model.tok_embeddings.weight.device
        if compile:
            internals()
        self.row_kernels = compile and self.device.type == "cpu" and inductor_emits_avx2()
        self._kept: dict[Hashable, tuple[tuple, object]] = {}

    def describe(self) -> str:
        """One line: native bf16 or not, the step, the row kernels and huge pages, each with its reason."""
        native, why = bf16_support(self.device)
        parts = [f"bf16 {'native' if native else 'emulated'} ({why})"]
        cpu = self.device.type == "cpu"
        if cpu and fp32_products.slow_bf16_cpu():
            parts[0] += ": bf16 and int8-weight products of prefills and scoring in fp32"
        if not self.compile:
            parts.append("eager step (compile=False)")
        elif cpu:
            parts.append("compiled step with frozen weights, autotuned GEMMs and C++ wrapper")
            parts.append("row kernels on (inductor emits AVX2 code)" if self.row_kernels else
                         f"row kernels off (written for AVX2; inductor emits {inductor_isa()} code, with its own "
                         "GEMM micro-kernels)")
        else:
            parts.append("compiled step with frozen weights, replayed as CUDA graphs")
        if cpu:
            mode = huge_pages_setting()
            parts.append(f"huge pages on (transparent_hugepage: {mode})" if mode else
                         "huge pages off (the system offers none)")
        return f"{self.device.type} backend: " + "; ".join(parts)

    def kept(self, key: Hashable, build: Callable[[], Kept]) -> Kept:
        """The object kept under ``key`` (a Decoder), built anew when the model's tensors were replaced or
        written in place since: a compiled step holds frozen copies of the weights."""
        signature = _weights_signature(self.model)
        entry = self._kept.get(key)
        if entry is None or entry[0] != signature:
            entry = self._kept[key] = (signature, build())
        return entry[1]

    def step_model(self) -> nn.Module:
        """The model the single-token step runs: a compiled CPU step's has stacked projections (``stacked``)."""
        return decode_view(self.model) if self.compile and self.device.type == "cpu" else self.model

    def compile_step(self, fn: Callable) -> Callable:
        """``fn`` (a step of fixed shapes) compiled where this backend compiles, else ``fn`` itself."""
        return CompiledStep(fn, self.model, self.device, row_kernels=self.row_kernels) if self.compile else fn

    def dynamic_length(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, its length a dynamic dimension of the compiled step: one graph for every length."""
        if self.compile:
            internals().mark_dynamic(tensor, 0)
        return tensor

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor on this device, on huge pages on the CPU (where a step reads it whole)."""
        block = torch.zeros(shape, dtype=dtype, device=self.device)
        back_with_huge_pages([block])
        return block

    def products(self, rows: int | None = None) -> contextlib.AbstractContextManager:
        """The product mode for eager passes of ``rows`` input rows (None: any): fp32 products for bf16 and int8
        weights where the CPU has no native bf16 (``fp32_products``), else the stock kernels."""
        return fp32_products.fp32_products(self.model, rows)


def _weights_signature(model: nn.Module) -> tuple:
    """Each tensor's address and in-place-write counter (None for tensors made under ``torch.inference_mode``,
    which keep no counter): it changes with training, ``load_state_dict``, ``to(dtype)`` or quantization."""
    return tuple((t.data_ptr(), _version(t)) for t in (*model.parameters(), *model.buffers()))


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:
        return None
