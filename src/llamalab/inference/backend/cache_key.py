"""What inductor's FX graph cache must key on but cannot see: llamalab's micro-kernels and the frozen weights.

Inductor keeps compiled graphs in a cache (in memory and on disk, shared by later processes) under a key made of
the graph's code, its inputs' shapes and the compile settings. It does not see the micro-kernel registry
(``row_kernels``), and a step compiled with freezing, which folds the weights in as constants, is keyed on those
weights' shapes and dtypes only. On a hit inductor reloads the frozen weights from the model at hand, but takes
every constant it derived from them at compile time (the CPU GEMM template's packed copies of the weights) from
the cache entry. A second model of the same shape, in the same process or a later one, then decoded with the
first model's packed weights: compiled bf16 and int8 steps gave logits off by 0.74 where the logits' largest
magnitude was 0.50. (fp32 steps escaped only because inductor never caches a graph that holds MKL's packed
weights.)

A graph pass that changes nothing but whose ``uuid`` joins the key closes both gaps: one names the kernels'
source, one the SHA-256 of every weight and buffer a step freezes. A cache hit then needs the same weights
(the same checkpoint run again), and other weights compile afresh.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .torch_internals import internals


def cache_key_pass(uuid: str):
    """A post-grad pass that leaves the graph alone and adds ``uuid`` to inductor's FX graph cache key."""

    class CacheKey(internals().CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return uuid

    return CacheKey()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s parameters and buffers (~1.4 GB/s here)."""
    digest = hashlib.sha256()
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()
