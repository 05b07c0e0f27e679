"""Transparent huge pages (2 MiB) under the weights a compiled CPU decode step streams (and under the key/value
cache, ``llamalab.generate.kv_caches``).

Decoding one token reads every weight once, so on a CPU it runs at the memory's read speed, and with 4 KiB
pages part of that speed goes to page walks. Measured on the 2-core machine of docs/generate.md, two threads
reading 440 MB: ``torch.sum`` 21-22 GB/s on 4 KiB pages, 23-24 GB/s on 2 MiB pages; a C matrix-vector product
over inductor's packed layout 18-20 vs 22-24 GB/s.

Linux backs anonymous memory with huge pages only where a program asks, under the usual ``madvise`` setting of
``/sys/kernel/mm/transparent_hugepage/enabled``. ``huge_pages_for_new_graphs`` asks for the constants (the
frozen, packed weights) of the graphs inductor compiles inside it: ``madvise(MADV_HUGEPAGE)`` marks the
range, and ``MADV_COLLAPSE`` (Linux 6.1+) moves it into huge pages at once, copying each 2 MiB once. Only the
whole 2 MiB pages inside a tensor's storage are touched, so nothing else in the process changes. Where the
system offers no huge pages (another OS, an old kernel, the setting ``never``) nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterable

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def back_with_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Move the whole 2 MiB pages inside each CPU tensor's storage onto huge pages; the bytes moved.

    Values are unchanged (the kernel copies the pages); a storage smaller than two huge pages may hold none.
    Tensors without a plain storage (oneDNN's opaque packed weights, which inductor keeps when it picks oneDNN's
    product, as with one thread) are left as they are.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    moved, seen = 0, set()
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.layout != torch.strided:
            continue
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        if start in seen:
            continue
        seen.add(start)
        first = -(-start // HUGE_PAGE) * HUGE_PAGE
        end = (start + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
        if end > first and madvise(first, end - first, _MADV_HUGEPAGE) == 0 \
                and madvise(first, end - first, _MADV_COLLAPSE) == 0:
            moved += end - first
    return moved


@contextlib.contextmanager
def huge_pages_for_new_graphs():
    """Back the constants of the graphs inductor compiles (or loads from its cache) in this block with huge pages.

    Inductor keeps a compiled graph's constants as globals of the Python module it generates, and lists those
    modules in ``PyCodeCache.modules``, which is internal: if that moves, this does nothing.
    """
    try:
        from torch._inductor.codecache import PyCodeCache

        modules = PyCodeCache.modules
        before = len(modules)
    except (ImportError, AttributeError):
        yield
        return
    yield
    back_with_huge_pages(value for module in modules[before:] for value in vars(module).values()
                         if isinstance(value, torch.Tensor))
