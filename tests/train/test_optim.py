"""The paper's optimiser recipe: schedule values, which tensors weight decay touches, gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.config import OptimizerConfig, ScheduleConfig
from llamalab.model import build_model, preset_args
from llamalab.train.metrics import training_flops_per_token
from llamalab.train.optim import Schedule, build_optimizer, clip_grad_norm, decayed_parameter_names


def test_schedule_warmup_peak_cosine_floor():
    peak, warmup, total = 3e-4, 2000, 10_000
    sched = Schedule(peak, ScheduleConfig(warmup_steps=warmup, min_lr_ratio=0.1), total)
    assert sched.lr(0) == pytest.approx(peak / warmup)  # first step of warmup
    assert sched.lr(999) == pytest.approx(peak / 2)  # linear
    assert sched.lr(warmup - 1) == pytest.approx(peak)  # end of warmup: the peak
    assert sched.lr(warmup) == pytest.approx(peak)  # cosine starts at the peak
    mid = warmup + (total - warmup) // 2
    assert sched.lr(mid) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # half way down the cosine: 55%
    assert sched.lr(total) == pytest.approx(0.1 * peak)  # the end: 10% of the peak
    assert sched.lr(total + 500) == pytest.approx(0.1 * peak)  # and it stays there
    values = [sched.lr(s) for s in range(warmup, total + 1, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_time_bounded_schedule_follows_the_clock():
    sched = Schedule(1.0, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), 10**12)
    assert sched.lr(5, time_fraction=0.2) == pytest.approx(0.6)  # warmup counts steps
    assert sched.lr(10, time_fraction=0.5) == pytest.approx(1.0)  # warmup ended half way: the cosine starts here
    assert sched.lr(50, time_fraction=0.75) == pytest.approx(0.55)  # half way through the remaining time
    assert sched.lr(90, time_fraction=1.0) == pytest.approx(0.1)  # the floor when the budget is spent
    resumed = Schedule(1.0, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), 10**12)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.lr(50, time_fraction=0.75) == pytest.approx(0.55)


def _tiny_model():
    return build_model(preset_args("tiny"), seed=0)


def test_weight_decay_reaches_exactly_the_matrices():
    model = _tiny_model()
    names = set(decayed_parameter_names(model))
    expected = {"tok_embeddings.weight", "output.weight"} | {
        f"layers.{i}.{part}.weight" for i in range(2)
        for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert names == expected
    # One AdamW step with zero gradients: only the decayed tensors move, by exactly (1 - lr * wd).
    opt = build_optimizer(model, OptimizerConfig(lr=0.5, weight_decay=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p, before[name] * (1 - 0.5 * 0.1), rtol=1e-6, atol=0)
        else:
            assert name.endswith("norm.weight")
            assert torch.equal(p, before[name])


def test_clipping_caps_the_global_norm_at_one():
    model = _tiny_model()
    tokens = torch.randint(0, 512, (2, 16))
    (model(tokens).float().pow(2).mean() * 1e4).backward()
    grads = [p.grad for p in model.parameters()]
    norm_before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm_before > 10
    reported = clip_grad_norm(model, 1.0)
    assert reported == pytest.approx(norm_before.item(), rel=1e-5)
    norm_after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert norm_after.item() == pytest.approx(1.0, rel=1e-5)
    # below the threshold nothing changes
    for p in model.parameters():
        p.grad.mul_(0.5)
    before = [p.grad.clone() for p in model.parameters()]
    clip_grad_norm(model, 1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_flops_per_token_is_6n_plus_attention():
    args = preset_args("small")
    n = 12 * (4 * 768 * 768 + 3 * 768 * args.ffn_hidden_dim) + 768 * args.vocab_size  # matmul weights only
    assert training_flops_per_token(args, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert math.isclose(training_flops_per_token(args, 1024) / 1e9, 0.81, rel_tol=0.05)
