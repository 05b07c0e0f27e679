"""A decode step compiled once, under the settings that make it pay, and replayed cheaply afterwards."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .cache_key import cache_key_pass, weights_digest
from .huge_pages import huge_pages_for_new_graphs
from .row_kernels import row_kernels
from .torch_internals import internals


class CompiledStep:
    """A compiled step whose first call (the one that compiles) runs under the compile settings.

    Inductor freezing (weights folded in as constants) is what makes a compiled CPU step pay; on CPU the
    matrix products are also autotuned against inductor's own C++ GEMM template, which at one row streams
    the weights far faster than MKL here (fp32 ``stories15m`` decode 8.1 -> 4.2 ms/token with the stacked
    projections and the in-place cache write). Every Decoder compiles the same function for its own caches and
    weights, so dynamo may keep more than its default 8 versions of it.

    The CPU step also uses inductor's C++ wrapper (``cpp_wrapper``): the ~50 kernel calls of a step are made
    from C++, not Python. With a model too small to cost anything (dim 48) a step fell from 0.73 to 0.41 ms;
    ``stories15m`` decode gained 3-5% (alternated in one process), for ~10 s more compile.

    Where inductor emits AVX2 code, one-row products with bf16 or int8 weights, and batched ones with bf16
    weights, use llamalab's own micro-kernels inside inductor's template (``row_kernels``): the stock AVX2 ones
    read bf16 weights slower than fp32 ones.

    On Linux the step's constants (its frozen weights) are then moved onto 2 MiB pages (``huge_pages``): a step
    streams them all, and 4 KiB pages read ~10% slower here.

    Later calls skip the settings and dynamo's guard checks (``skip_guard_eval_unsafe``: only the checks
    that tell the Decoders' versions apart run): a Decoder's shapes never change but for the attention
    window, which the graph takes as a dynamic length and ``Decoder.window`` keeps within the cache; the full
    check cost ~0.3 ms per token.

    On CUDA the step is a CUDA graph whose output lives in the graph's own memory, overwritten by the next
    replay; the caller feeds one step's token into the next and may keep logits, so each output is cloned
    (a few bytes per row, or one row of logits) and each call starts a new graph step.

    Inductor's FX graph cache keys the compile on a digest of the model's weights (``cache_key``): it keys a
    frozen graph on the weights' shapes only, and would serve a model of the same shape the packed weights of
    another.
    """

    def __init__(self, fn, model: nn.Module, device: torch.device, *, row_kernels: bool):
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.fn = torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
        self.model, self.device, self.row_kernels, self.warm = model, device, row_kernels, False

    def __call__(self, *args):
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
            return self._run(*args).clone()
        return self._run(*args)

    def _run(self, *args):
        if self.warm:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(*args)
        with contextlib.ExitStack() as settings:
            for context in self._compile_settings():
                settings.enter_context(context)
            out = self.fn(*args)
        self.warm = True
        return out

    def _compile_settings(self) -> list[contextlib.AbstractContextManager]:
        private = internals()
        inductor = {"freezing": True,
                    "post_grad_custom_pre_pass": cache_key_pass("llamalab-weights-" + weights_digest(self.model))}
        if self.device.type == "cpu":
            inductor.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", cpp_wrapper=True,
                            autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
        settings = [private.inductor_config.patch(inductor),
                    private.dynamo_config.patch(recompile_limit=max(64, private.dynamo_config.recompile_limit))]
        if self.device.type == "cpu":
            settings.append(huge_pages_for_new_graphs())
            if self.row_kernels:
                settings.append(row_kernels())
        return settings
