"""Activation checkpointing (selective and full) gives the gradients of plain backprop, and saves memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from llamalab.model import build_model, preset_args
from llamalab.parallel.activation_checkpoint import (
    SAVED_OPS,
    _save_matmuls_policy,
    apply_activation_checkpointing,
)
from llamalab.train.metrics import activation_bytes


def _grads(mode: str, autocast: bool) -> tuple[torch.Tensor, dict]:
    model = build_model(preset_args("tiny"), seed=0)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_gradients_as_without(mode, autocast):
    loss_ref, ref = _grads("none", autocast)
    loss, got = _grads(mode, autocast)
    assert torch.equal(loss, loss_ref)
    for name in ref:  # recomputation repeats the same kernels on the same inputs: identical results
        assert torch.equal(got[name], ref[name]), name


def test_policy_saves_matmuls_and_attention_only():
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.bmm.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert op in SAVED_OPS
        assert _save_matmuls_policy(None, op) == CheckpointPolicy.MUST_SAVE
    for op in (aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten._to_copy.default):
        assert _save_matmuls_policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE


def _activation_bytes(mode: str) -> int:
    model = build_model(preset_args("tiny"), seed=0)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    return activation_bytes(lambda: model(tokens))


def test_checkpointing_keeps_fewer_activations():
    none, selective, full = (_activation_bytes(m) for m in ("none", "selective", "full"))
    assert full < selective < none
