"""Activation checkpointing (selective and full) gives the gradients of plain backprop, and saves memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from llamalab.model import apply_dropout, build_model, preset_args
from llamalab.parallel.activation_checkpoint import (
    MATMUL_OPS,
    SAVED_PROJECTIONS,
    SelectivePolicy,
    apply_activation_checkpointing,
    saved_weight_shapes,
)
from llamalab.train.metrics import activation_bytes


def _grads(mode: str, autocast: bool, dropout: float = 0.0) -> tuple[torch.Tensor, dict]:
    model = apply_dropout(build_model(preset_args("tiny"), seed=0), dropout)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # dropout's masks: recomputation must draw the same ones
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_same_gradients_as_without(mode, autocast, dropout):
    loss_ref, ref = _grads("none", autocast, dropout)
    loss, got = _grads(mode, autocast, dropout)
    assert torch.equal(loss, loss_ref)
    for name in ref:  # recomputation repeats the same kernels on the same inputs (and masks): identical results
        assert torch.equal(got[name], ref[name]), name


def test_policy_saves_attention_and_w1_w3_only():
    aten = torch.ops.aten
    policy = SelectivePolicy(frozenset({(64, 192)}))
    assert policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE
    for op in (aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten._to_copy.default):
        assert policy(None, op) == CheckpointPolicy.PREFER_RECOMPUTE
    x = torch.empty(8, 64)
    assert policy(None, aten.mm.default, x, torch.empty(192, 64).t()) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.mm.default, x, torch.empty(64, 64).t()) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_policy_saves_exactly_the_w1_w3_products(autocast, lora):
    """The policy recognises w1/w3 by their weights' shape; check that against the modules that issue each matrix
    product of a real block (also with LoRA adapters, which add products of their own)."""
    model = build_model(preset_args("tiny"), seed=0)
    if lora:
        from llamalab.finetune.lora import apply_lora

        apply_lora(model, ["wq", "wv", "w1", "w2", "w3"], rank=4, alpha=8)
    block = model.layers["0"]
    policy = SelectivePolicy(saved_weight_shapes(block))
    current: list[str] = []  # the stack of submodules being run

    def leave(module, args, output) -> None:
        current.pop()

    for path, module in block.named_modules():
        if path:
            module.register_forward_pre_hook(lambda m, a, p=path: current.append(p))
            module.register_forward_hook(leave)
    saved, recomputed = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in MATMUL_OPS:
                keep = policy(None, func, *args, **(kwargs or {})) == CheckpointPolicy.MUST_SAVE
                (saved if keep else recomputed).append(current[-1])
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 16, block.attention.wq.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), Record():
        block(x, model.rope_cos, model.rope_sin)
    assert saved == list(SAVED_PROJECTIONS)
    assert len(recomputed) == (15 if lora else 5)  # wq wk wv wo w2, and with LoRA the 5 adapters A and B


def _activation_bytes(mode: str, autocast: bool) -> int:
    model = build_model(preset_args("tiny"), seed=0)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))

    def forward():  # leave autocast inside: its cache of weight casts is not an activation
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(tokens)

    return activation_bytes(forward)


@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointing_keeps_fewer_activations(autocast):
    none, selective, full = (_activation_bytes(m, autocast) for m in ("none", "selective", "full"))
    assert full < selective <= 0.7 * none  # selective saves at least 30% (44% in fp32, 58% in bf16 here)
    # beyond full's block inputs, selective keeps exactly: per block the attention output and its log-sum-exp
    # (fp32: on the CPU the tiny preset's 16-dimension heads are attended in fp32 even under autocast), and
    # the w1 and w3 outputs
    args = preset_args("tiny")
    tokens, size = 4 * 64, 2 if autocast else 4
    per_block = tokens * args.dim * 4 + 4 * args.n_heads * 64 * 4 + 2 * tokens * args.ffn_hidden_dim * size
    assert selective - full == args.n_layers * per_block
