"""Every private torch name the inference backend uses, looked up and checked in this one place.

``torch._inductor`` and ``torch._dynamo`` are torch's internals, which any release may move. llamalab is tested on
torch 2.13 only (``pyproject.toml`` accepts ``torch>=2.13,<2.14``), so on another version a name that moved is a
``RuntimeError`` naming it and the torch version, raised when a compiling backend is built: never a silent
fallback to a slower step. No other llamalab module imports from these packages.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

TESTED_TORCH, TORCH_RANGE = "2.13", ">=2.13,<2.14"  # the release the tests cover; pyproject.toml's range

# the inductor settings a compiled step changes (``compiled_step``, ``row_kernels``)
INDUCTOR_SETTINGS = ("freezing", "max_autotune", "max_autotune_gemm_backends", "cpp_wrapper",
                     "autotune_num_choices_displayed", "max_autotune_report_choices_stats",
                     "post_grad_custom_pre_pass", "post_grad_custom_post_pass")


def resolve(module: str, attribute: str = ""):
    """``module`` imported, then its dotted ``attribute``; a RuntimeError that names what is missing if it moved."""
    try:
        found = importlib.import_module(module)
        for part in filter(None, attribute.split(".")):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        name = f"{module}.{attribute}" if attribute else module
        raise RuntimeError(
            f"torch {torch.__version__} has no {name}, a private torch API that llamalab's compiled decode step "
            f"uses; llamalab is tested on torch {TESTED_TORCH} only: install it with "
            f"pip install 'torch{TORCH_RANGE}' (or decode without compile)") from exc
    return found


@functools.cache
def internals() -> SimpleNamespace:
    """The private names, all resolved at the first call (which imports inductor, ~1 s)."""
    resolve("torch._inductor.compile_fx")  # inductor's own import order: importing its codegen first is circular
    for setting in INDUCTOR_SETTINGS:
        resolve("torch._inductor.config", setting)
    resolve("torch._dynamo.config", "recompile_limit")
    resolve("torch._inductor.codecache", "PyCodeCache.modules")
    micro_gemm = "torch._inductor.codegen.cpp_micro_gemm"
    for method in ("get_kernel_declaration", "get_common_options"):  # what the row kernels' codegen calls
        resolve(micro_gemm, f"CppMicroGemm.{method}")
    return SimpleNamespace(
        inductor_config=resolve("torch._inductor.config"),
        dynamo_config=resolve("torch._dynamo.config"),
        mark_dynamic=resolve("torch._dynamo", "mark_dynamic"),
        CustomGraphPass=resolve("torch._inductor.custom_graph_pass", "CustomGraphPass"),
        PyCodeCache=resolve("torch._inductor.codecache", "PyCodeCache"),
        CppMicroGemm=resolve(micro_gemm, "CppMicroGemm"),
        micro_gemm_configs=resolve(micro_gemm, "micro_gemm_configs"),
        generate_gemm_config=resolve(micro_gemm, "generate_gemm_config"),
        render_template=resolve("torch._inductor.codegen.common", "KernelTemplate._template_from_string"),
        VecAVX2=resolve("torch._inductor.cpu_vec_isa", "VecAVX2"),
        pick_vec_isa=resolve("torch._inductor.cpu_vec_isa", "pick_vec_isa"),
    )
