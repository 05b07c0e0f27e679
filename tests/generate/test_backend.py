"""The inference backend: one log line saying what is on and why, Decoders kept by the backend (never on the model),
and a moved private torch API named in an error rather than silently worked around."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from llamalab.checkpoint import save_pretrained
from llamalab.generate import generate_tokens, get_decoder
from llamalab.inference.backend import Backend, accelerate, torch_internals
from llamalab.inference.backend import fp32_products as fp
from llamalab.inference.quantize import quantize_int8
from llamalab.model import build_model


def logged_line(caplog, model, **options) -> str:
    with caplog.at_level(logging.INFO, logger="llamalab.inference.backend"):
        accelerate(model, **options)
    (record,) = caplog.records
    return record.getMessage()


def test_start_up_line_where_bf16_is_native(caplog, monkeypatch, model):
    monkeypatch.setenv("LLAMALAB_FAST_BF16", "1")
    monkeypatch.setattr(fp, "slow_bf16_cpu", lambda: False)
    line = logged_line(caplog, model, compile=True)
    assert line.startswith("cpu backend: bf16 native (LLAMALAB_FAST_BF16=1); compiled step with frozen weights")
    assert "in fp32" not in line and "; row kernels o" in line and "; huge pages o" in line


def test_start_up_line_where_bf16_is_emulated(caplog, monkeypatch, model):
    monkeypatch.setenv("LLAMALAB_FAST_BF16", "0")
    monkeypatch.setattr(fp, "slow_bf16_cpu", lambda: True)
    line = logged_line(caplog, model)
    assert line.startswith("cpu backend: bf16 emulated (LLAMALAB_FAST_BF16=0): bf16 and int8-weight products of "
                           "prefills and scoring in fp32; eager step (compile=False)")
    assert "row kernels" not in line  # they only concern a compiled step


def test_decoders_belong_to_the_backend_and_follow_the_weights(model, tiny_args):
    """One Decoder per shape, kept by the backend (the model's ``__dict__`` stays clean), rebuilt when the weights
    are replaced (``quantize_int8``, ``to``) or written in place; a bare model keeps nothing between calls."""
    own = build_model(tiny_args(), seed=6).eval()
    attributes = set(vars(own))
    backend = Backend(own)
    decoder = get_decoder(backend, 3, 20)
    assert get_decoder(backend, 3, 40) is decoder  # the same 64-slot shape
    assert get_decoder(own, 3, 20) is not get_decoder(own, 3, 20)
    with torch.no_grad():
        own.load_state_dict(model.state_dict())
    rebuilt = get_decoder(backend, 3, 20)
    assert rebuilt is not decoder
    quantize_int8(own)
    assert get_decoder(backend, 3, 20) is not rebuilt
    assert generate_tokens(backend, [[1, 5, 6]], max_new_tokens=8) == generate_tokens(own, [[1, 5, 6]], max_new_tokens=8)
    assert set(vars(own)) == attributes


def test_load_returns_the_bundle_that_keeps_the_backends(model, tokenizer, tmp_path):
    import llamalab

    pretrained = llamalab.load(save_pretrained(tmp_path / "ckpt", model, tokenizer_path=tokenizer.path))
    backend = pretrained.accelerate(compile=True)
    assert pretrained.accelerate(compile=True) is backend and pretrained.accelerate() is not backend
    assert backend.model is pretrained.model and backend.compile


def test_a_moved_private_api_is_an_error_naming_it(monkeypatch, model):
    message = rf"torch {re.escape(torch.__version__)} has no torch\._inductor\.codecache\.PyCodeCache\.gone, a private torch " \
              r"API.*tested on torch 2\.13.*pip install 'torch>=2\.13,<2\.14'"
    with pytest.raises(RuntimeError, match=message):
        torch_internals.resolve("torch._inductor.codecache", "PyCodeCache.gone")
    torch_internals.internals()  # resolves with the real torch
    import torch._inductor.cpu_vec_isa as vec_isa

    monkeypatch.delattr(vec_isa, "VecAVX2")
    torch_internals.internals.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"has no torch\._inductor\.cpu_vec_isa\.VecAVX2, "):
            Backend(model, compile=True)
        Backend(model)  # an eager backend needs no private name
    finally:
        monkeypatch.undo()
        torch_internals.internals.cache_clear()
