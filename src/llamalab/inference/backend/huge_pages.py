"""Transparent huge pages (2 MiB) under the weights a compiled CPU decode step streams and under the key/value cache.

Decoding one token reads every weight once, so on a CPU it runs at the memory's read speed, and with 4 KiB
pages part of that speed goes to page walks. Measured on the 2-core machine of docs/generate.md, two threads
reading 440 MB: ``torch.sum`` 21-22 GB/s on 4 KiB pages, 23-24 GB/s on 2 MiB pages; a C matrix-vector product
over inductor's packed layout 18-20 vs 22-24 GB/s.

Linux backs anonymous memory with huge pages only where a program asks, under the usual ``madvise`` setting of
``/sys/kernel/mm/transparent_hugepage/enabled``. ``back_with_huge_pages`` asks for a tensor's storage:
``madvise(MADV_HUGEPAGE)`` marks the range, and ``MADV_COLLAPSE`` (Linux 6.1+) moves it into huge pages at once,
copying each 2 MiB once. Only the whole 2 MiB pages inside a storage are touched, so nothing else in the process
changes. Where the system offers no huge pages (another OS, an old kernel, the setting ``never``) nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from .torch_internals import internals

HUGE_PAGE = 2 << 20
# Python's mmap names MADV_HUGEPAGE; MADV_COLLAPSE (Linux 6.1) it does not, so here is the kernel's own value
# (include/uapi/asm-generic/mman-common.h)
MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_setting() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``), or None where none are offered."""
    if _madvise() is None or not THP_SETTING.exists():
        return None
    mode = THP_SETTING.read_text().split("[", 1)[-1].split("]", 1)[0]
    return None if mode == "never" else mode


@functools.cache
def _madvise():
    """libc's ``madvise`` for raw addresses (torch storages are no ``mmap`` objects, whose ``madvise`` is public)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
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
        if end > first and madvise(first, end - first, mmap.MADV_HUGEPAGE) == 0 \
                and madvise(first, end - first, MADV_COLLAPSE) == 0:
            moved += end - first
    return moved


@contextlib.contextmanager
def huge_pages_for_new_graphs():
    """Back the constants of the graphs inductor compiles (or loads from its cache) in this block with huge pages.

    Inductor keeps a compiled graph's constants as globals of the Python module it generates, and lists those
    modules in ``PyCodeCache.modules``.
    """
    modules = internals().PyCodeCache.modules
    before = len(modules)
    yield
    back_with_huge_pages(value for module in modules[before:] for value in vars(module).values()
                         if isinstance(value, torch.Tensor))
