"""Facts about the machine the code runs on: native bf16 or not, the measured matmul peak.

The lowest layer beside ``errors`` and ``fs``: training (precision, MFU), inference (which products run in fp32)
and evaluation read the same answers from here.
"""

from __future__ import annotations

import functools
import os
import time

import torch


def measure_peak_flops(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                       size: int | None = None, seconds: float = 0.3) -> float:
    """Best FLOP/s of square matmuls in ``dtype`` over about ``seconds`` (the MFU denominator).

    Without ``size`` the matrices grow from 256 until one product takes over 50 ms (up to 2048 on a CPU, 8192
    on a GPU), so a CPU without native bf16 -- where a bf16 product can be 100x slower than fp32 -- is measured
    in a fraction of a second too. The best of several repetitions, so a busy machine lowers it less than a mean.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = [size] if size else [n for n in (256, 512, 1024, 2048, 4096, 8192)
                                 if device.type == "cuda" or n <= 2048]

    def timed_mm(a, b) -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - start

    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        timed_mm(a, b)  # warm-up: kernel selection, page faults
        if timed_mm(a, b) > 0.05 or n == sizes[-1]:
            break
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        best = max(best, 2.0 * n**3 / timed_mm(a, b))
        if time.perf_counter() > deadline:
            return best


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 and AMX; Arm's BF16 extension


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run on native units here: CUDA GPUs with bf16, CPUs with a bf16 flag.

    Without one (e.g. AVX2-only CPUs) torch's bf16 products are emulated, ~100x slower than fp32. Decided from
    the hardware's capabilities, never from a timing race; ``LLAMALAB_FAST_BF16=0`` or ``1`` overrides it (to
    test either branch on any machine).
    """
    return bf16_support(device)[0]


def bf16_support(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """``fast_bf16`` and what it was decided from, for logs: the override, the GPU, or the CPU's bf16 flags."""
    forced = os.environ.get("LLAMALAB_FAST_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"LLAMALAB_FAST_BF16={forced}"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device)
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    return bool(found), ", ".join(found) or f"no {' / '.join(BF16_CPU_FLAGS)} flag"
