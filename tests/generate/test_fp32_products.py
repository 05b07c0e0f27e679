"""bf16 and int8-weight products rerouted to fp32 (for CPUs without native bf16): same numbers, used by the prefill
and, applied by the eval command, by scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalab.generate import Decoder
from llamalab.inference.backend import Backend
from llamalab.inference.backend import fp32_products as fp
from llamalab.inference.quantize import Int8Linear, quantize_int8, quantize_per_channel
from llamalab.model import build_model

BF16_ULP = 2.0**-7  # one unit in the last place of a bf16, relative


@pytest.mark.parametrize("batch", [(3, 7), (2, 150)], ids=["transposed", "row-major"])
def test_linear_fp32_matches_the_fp32_product_across_blocks(batch):
    """1100 weight rows: two whole 512-row blocks and a partial one; 21 input rows, or 300 (row-major)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, 96, generator=gen).bfloat16()
    weight = torch.randn(1100, 96, generator=gen)
    got = fp.linear_fp32(x, weight.bfloat16())
    assert got.shape == (*batch, 1100) and got.dtype == torch.bfloat16
    assert got.is_contiguous() == (batch[0] * batch[1] >= fp.ROW_MAJOR_ROWS)
    want = F.linear(x.float(), weight.bfloat16().float())
    torch.testing.assert_close(got.float(), want, rtol=BF16_ULP, atol=1e-5)

    q, scales = quantize_per_channel(weight)
    got = fp.linear_fp32(x, q, scales.bfloat16())
    want = F.linear(x.float(), q.float()) * scales.bfloat16().float()
    torch.testing.assert_close(got.float(), want, rtol=BF16_ULP, atol=1e-5)


@pytest.fixture
def calls(monkeypatch):
    """Counts the products the mode reroutes."""
    counted = []
    real = fp.linear_fp32

    def counting(*args):
        counted.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(fp, "linear_fp32", counting)
    return counted


def test_only_wide_bf16_and_int8_products_are_rerouted_and_only_inside(calls, monkeypatch):
    monkeypatch.setattr(fp, "slow_bf16_cpu", lambda: True)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=gen)
    bf16 = torch.nn.Linear(64, 48, bias=False).bfloat16()
    fp32 = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        bf16.weight.copy_(weight)
        fp32.weight.copy_(weight)
    int8 = Int8Linear.from_linear(bf16)
    model = torch.nn.ModuleList([bf16, fp32, int8])
    wide, narrow = (torch.randn(n, 64, generator=gen).bfloat16() for n in (fp.MIN_ROWS[torch.int8], 7))
    with fp.fp32_products(model):
        bf16(wide).float().sum().backward()  # with autograd on: the stock product
        assert calls == [] and bf16.weight.grad is not None
        with torch.no_grad():
            rerouted, stock = bf16(wide), bf16(narrow)
            fp32(wide.float())  # fp32: never rerouted
            int8_wide, int8_narrow = int8(wide), int8(wide[:-1])
            with fp.fp32_products(model):  # nested: the outer context keeps its layers
                bf16(wide)
    assert len(calls) == 3
    assert all("forward" not in layer.__dict__ for layer in model)  # the layers are themselves again
    torch.testing.assert_close(rerouted.float(), F.linear(wide.float(), weight.bfloat16().float()),
                               rtol=BF16_ULP, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(stock, bf16(narrow))  # untouched: the stock kernel's bits
        torch.testing.assert_close(int8_wide.float(), int8(wide).float(), rtol=2 * BF16_ULP, atol=1e-4)
        assert torch.equal(int8_narrow, int8(wide[:-1]))
        assert len(calls) == 3
        monkeypatch.setattr(fp, "slow_bf16_cpu", lambda: False)  # where bf16 is fast, nothing is rerouted
        with fp.fp32_products(model):
            bf16(wide)
    assert len(calls) == 3


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "int8"])
def test_prefill_multiplies_in_fp32_where_bf16_is_slow(tiny_args, calls, monkeypatch, quantize):
    model = build_model(tiny_args(vocab_size=256), seed=4).eval()
    fp32_logits = Decoder(model, 1, 64).prefill([list(range(1, 41))])  # prefill enters inference mode itself
    low = model.to(torch.bfloat16)
    if quantize:
        low = quantize_int8(low)
    results = {}
    for slow in (False, True):
        monkeypatch.setattr(fp, "slow_bf16_cpu", lambda slow=slow: slow)
        calls.clear()
        results[slow] = Decoder(low, 1, 64).prefill([list(range(1, 41))])
        # where slow: the 7 products of each of the 2 layers; the output layer sees only the last token
        assert len(calls) == (2 * 7 if slow else 0)
    # short prompts keep the stock kernels even where bf16 is slow
    calls.clear()
    Decoder(low, 1, 64).prefill([[1, 2, 3]])
    assert calls == []
    tolerance = 0.1 if quantize else 0.05
    torch.testing.assert_close(results[True], fp32_logits, rtol=0, atol=tolerance)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=tolerance)


def test_scorer_multiplies_in_fp32_under_the_backends_products_where_bf16_is_slow(tiny_args, calls, monkeypatch):
    """The eval command scores under its backend's product mode (``llamalab.commands.eval``)."""
    from llamalab.eval.harness import Scorer, TokenRequest

    model = build_model(tiny_args(vocab_size=256), seed=5).eval().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(6)
    requests = [TokenRequest((1, *torch.randint(3, 256, (20,), generator=gen).tolist()),
                             tuple(torch.randint(3, 256, (4,), generator=gen).tolist())) for _ in range(6)]
    scores = {}
    for slow in (False, True):
        monkeypatch.setattr(fp, "slow_bf16_cpu", lambda slow=slow: slow)
        calls.clear()
        with Backend(model).products():
            scores[slow] = Scorer(model, batch_size=8, progress=False).score(requests)
        assert (len(calls) > 0) == slow
    for (ll_stock, greedy_stock), (ll_fp32, greedy_fp32) in zip(scores[False], scores[True]):
        assert abs(ll_fp32 - ll_stock) < 0.05 * max(1.0, abs(ll_stock))
        assert greedy_fp32 == greedy_stock
