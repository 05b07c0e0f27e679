"""The fast decode path: compiled step, bf16 weights and int8 weight-only quantization against the reference."""

from __future__ import annotations

import pytest
import torch

from llamalab.generate import StackedLinear, blocked_argmax, decode_view, generate_tokens, get_decoder
from llamalab.inference.cache_key import weights_digest
from llamalab.inference.quantize import Int8Linear, quantize_int8, quantize_per_channel
from llamalab.model import build_model

PROMPTS = [[1, 17, 40, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207], [1]]


def copy_model(model, dtype=torch.float32, device="cpu"):
    m = build_model(model.args, device=device, init=False).eval()
    m.load_state_dict(model.state_dict())
    return m.to(dtype)


def decode_logits(model, tokens: torch.Tensor, prefill: int, compile: bool) -> torch.Tensor:
    """Step logits (batch, steps, vocab) of teacher-forced decoding after a prefill.

    Uses the model's shared Decoder for this shape, so a later ``generate_tokens`` call reuses its compiled step.
    """
    decoder = get_decoder(model, tokens.shape[0], tokens.shape[1], compile=compile)
    out = []
    with torch.inference_mode():
        decoder.prefill(tokens[:, :prefill].tolist())
        for t in range(prefill, tokens.shape[1]):
            pos = torch.full((tokens.shape[0], 1), t, device=tokens.device)
            out.append(decoder._step(tokens[:, t:t + 1], pos, decoder.window(t)))
    return torch.stack(out, 1)


def test_int8_quantization_round_trip_error_is_bounded():
    w = torch.randn(96, 64)
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step per weight
    lin = torch.nn.Linear(64, 96, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(5, 64)
    torch.testing.assert_close(Int8Linear.from_linear(lin)(x), x @ (q.float() * scales[:, None]).T,
                               rtol=1e-5, atol=1e-5)


def test_int8_logits_within_tolerance(model):
    """Int8 weights move the logits by a few percent of their spread: |diff| <= 0.05 * std(logits)."""
    tokens = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        got = quantize_int8(copy_model(model))(tokens)
    assert (got - ref).abs().max() <= 0.05 * ref.std()
    assert (got - ref).abs().max() > 0  # it did quantize


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [False, True])
def test_decode_view_stacks_projections_and_computes_the_same(model, quantize):
    """The compiled step's view runs q/k/v and w1/w3 as one product each, on the model's own tensors."""
    source = quantize_int8(copy_model(model)) if quantize else model
    view = decode_view(source)
    layer, original = view.layers["0"], source.layers["0"]
    assert isinstance(layer.attention.wqkv, StackedLinear) and isinstance(layer.feed_forward.w13, StackedLinear)
    assert layer.attention.wqkv.sizes == [original.attention.wq.weight.shape[0], original.attention.wk.weight.shape[0],
                                          original.attention.wv.weight.shape[0]]  # grouped-query: k/v are narrower
    assert layer.attention.wqkv.parts[0].weight.data_ptr() == original.attention.wq.weight.data_ptr()
    assert type(source.layers["0"].attention).__name__ == "Attention"  # the model itself is untouched
    tokens = torch.tensor(PROMPTS[1])[None]
    with torch.no_grad():
        torch.testing.assert_close(view(tokens), source(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [32000, 1001])
def test_blocked_argmax_is_argmax_with_first_index_on_ties(vocab):
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 300, vocab - 1]] = 10.0  # ties within and across blocks: the first index wins
    logits[2, [vocab - 1, 5]] = 10.0
    logits[3] = 0.0  # all equal
    assert blocked_argmax(logits).tolist() == logits.argmax(-1).tolist()
    assert blocked_argmax(logits).tolist()[1:] == [7, 5, 0]


def test_compiled_decode_matches_reference_and_never_recompiles(model):
    """Compiled fp32 step: same logits as eager (1e-4) and same greedy tokens; positions advance without recompiling,
    also when the attention window grows from 64 to 128 slots."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tokens = torch.randint(0, model.args.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    eager = decode_logits(model, tokens, 4, compile=False)
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile as the position moves fails here
        compiled = decode_logits(model, tokens, 4, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1  # one graph for 96 positions

    reference = generate_tokens(model, PROMPTS, max_new_tokens=100)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert generate_tokens(model, PROMPTS, max_new_tokens=100, compile=True) == reference
        # the same shape again (new prompts, other lengths) reuses the compiled step
        assert generate_tokens(model, [[1, 5], [1, 6, 7], [1]], max_new_tokens=110, compile=True) == \
            generate_tokens(model, [[1, 5], [1, 6, 7], [1]], max_new_tokens=110)


def test_compiled_step_follows_in_place_weight_changes(tiny_args):
    """The compiled step freezes the weights; changing them in place (training, load_state_dict) rebuilds it."""
    model = build_model(tiny_args(), seed=2).eval()
    prompts = [[1, 17, 40, 3]]
    before = generate_tokens(model, prompts, max_new_tokens=12, compile=True)
    assert before == generate_tokens(model, prompts, max_new_tokens=12)
    with torch.no_grad():
        model.load_state_dict(build_model(tiny_args(), seed=3).state_dict())
    after = generate_tokens(model, prompts, max_new_tokens=12)
    assert after != before
    assert generate_tokens(model, prompts, max_new_tokens=12, compile=True) == after


def test_compiled_steps_of_two_models_stay_apart(model):
    """Warm steps skip dynamo's full guard check; a second model of the same shape must still get its own step
    (its own frozen weights), and the first model its own afterwards."""
    other = build_model(model.args, seed=1).eval()
    prompts = [[1, 17, 40, 3]]
    expected = [generate_tokens(m, prompts, max_new_tokens=12) for m in (model, other)]
    assert expected[0] != expected[1]
    for _ in range(2):
        assert [generate_tokens(m, prompts, max_new_tokens=12, compile=True) for m in (model, other)] == expected


@pytest.mark.slow
def test_compiled_bf16_models_of_one_shape_keep_their_own_weights(tiny_args):
    """Inductor's FX graph cache keys a frozen graph on the weights' shapes, and serves its packed copies of the
    weights from the cache entry: the second bf16 model of a shape, compiled after the first has filled the
    entry, must still decode with its own weights (it decoded with the first one's before the weights' digest
    joined the key)."""
    tokens = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(3))
    for seed in (4, 5):
        bf16 = build_model(tiny_args(n_layers=1), seed=seed).eval().to(torch.bfloat16)
        ref = decode_logits(bf16, tokens, 4, compile=False)
        assert (decode_logits(bf16, tokens, 4, compile=True) - ref).abs().max() <= 0.03 * ref.std()


def test_weights_digest_covers_values_buffers_and_dtype(tiny_args):
    model = build_model(tiny_args(), seed=0).eval()
    digest = weights_digest(model)
    assert digest == weights_digest(build_model(tiny_args(), seed=0).eval())
    assert digest != weights_digest(build_model(tiny_args(), seed=1).eval())
    assert digest != weights_digest(copy_model(model, torch.bfloat16))
    with torch.no_grad():
        model.layers["1"].ffn_norm.weight[7] += 1e-3  # one value of one small tensor
    assert digest != weights_digest(model)
    int8 = quantize_int8(copy_model(model))
    changed = quantize_int8(copy_model(model))
    changed.output.scales[0] *= 2  # a buffer, not a parameter
    assert weights_digest(int8) != weights_digest(changed)


@pytest.mark.slow
def test_compiled_bf16_and_int8_paths(model):
    """bf16 weights: logits within bf16 tolerance of fp32; int8 (bf16 activations): within the int8 bound."""
    tokens = torch.randint(0, model.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(model, tokens, 4, compile=False)
    spread = ref.std()
    bf16 = decode_logits(copy_model(model, torch.bfloat16), tokens, 4, compile=True)
    assert (bf16 - ref).abs().max() <= 0.03 * spread
    fast = quantize_int8(copy_model(model, torch.bfloat16))
    int8 = decode_logits(fast, tokens, 4, compile=True)
    assert (int8 - ref).abs().max() <= 0.08 * spread
    # batched on the fast path equals each prompt alone on the reference (eager) path of the same weights
    batched = generate_tokens(fast, PROMPTS, max_new_tokens=16, compile=True)
    assert batched == [generate_tokens(fast, [p], max_new_tokens=16)[0] for p in PROMPTS]


def test_int8_generation_close_to_fp32(tiny_args):
    """A model with peaked logits (larger init) greedy-decodes the same first tokens after int8 quantization."""
    args = tiny_args(vocab_size=256)
    model = build_model(args, seed=3).eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # confident predictions, so argmax is stable under 1% noise
    ref = generate_tokens(model, PROMPTS, max_new_tokens=8)
    got = generate_tokens(quantize_int8(copy_model(model)), PROMPTS, max_new_tokens=8)
    agree = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    assert agree >= 0.9 * sum(map(len, ref))


@pytest.mark.parametrize("in_features", [172, 288])
def test_int8_linear_any_width_and_unaligned_input(in_features):
    """stories260K's 172-wide w2 and inputs that are views at odd offsets give the dequantized product."""
    lin = torch.nn.Linear(in_features, 40, bias=False).to(torch.bfloat16)
    q = Int8Linear.from_linear(lin)
    buf = torch.randn(3 * in_features + 1, dtype=torch.bfloat16)
    x = buf[1:].view(3, in_features)  # starts 2 bytes into the storage
    ref = x.float() @ (q.weight.float() * q.scales.float()[:, None]).T
    torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
def test_cuda_graph_decode_matches_cpu_reference_and_never_recompiles(model):
    """On a GPU the compiled step is replayed as a CUDA graph: fp32 logits and greedy tokens equal the CPU eager
    reference, positions advance without recompiling, and inductor did not fall back from CUDA graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gpu = copy_model(model, device="cuda")
    tokens = torch.randint(0, model.args.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    eager = decode_logits(model, tokens, 4, compile=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = decode_logits(gpu, tokens.cuda(), 4, compile=True)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for 96 positions
        assert generate_tokens(gpu, PROMPTS, max_new_tokens=100, compile=True) == \
            generate_tokens(model, PROMPTS, max_new_tokens=100)
    torch.testing.assert_close(compiled.cpu(), eager, rtol=0, atol=1e-4)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]  # graphs were really replayed


@requires_cuda
def test_cuda_graph_bf16_and_int8_paths(model):
    """The bf16 and int8 models on the GPU: logits within the CPU tests' bounds, batched equals per-prompt."""
    tokens = torch.randint(0, model.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(model, tokens, 4, compile=False)
    spread = ref.std()
    bf16 = copy_model(model, torch.bfloat16, device="cuda")
    assert (decode_logits(bf16, tokens.cuda(), 4, compile=True).cpu() - ref).abs().max() <= 0.03 * spread
    fast = quantize_int8(copy_model(model, torch.bfloat16, device="cuda"))
    assert (decode_logits(fast, tokens.cuda(), 4, compile=True).cpu() - ref).abs().max() <= 0.08 * spread
    batched = generate_tokens(fast, PROMPTS, max_new_tokens=16, compile=True)
    assert batched == [generate_tokens(fast, [p], max_new_tokens=16)[0] for p in PROMPTS]


def _inductor_picks_avx2() -> bool:
    from torch._inductor.cpu_vec_isa import VecAVX2, pick_vec_isa

    return type(pick_vec_isa()) is VecAVX2


@pytest.mark.skipif(not _inductor_picks_avx2(), reason="the row kernels are for AVX2 (not AVX-512) builds")
@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("rows,out_features,in_features", [(1, 1024, 288), (1, 96, 176), (3, 1024, 288),
                                                           (8, 160, 176), (8, 96, 176), (7, 96, 176), (32, 864, 288)])
def test_row_kernels_are_chosen_and_exact(weights, rows, out_features, in_features):
    """Inductor takes the one-row kernel for one row; for more rows of bf16 weights the 4x24 block where 24
    divides N and the two-row one (with a one-row tail) otherwise, the stock kernel for int8; the product
    equals fp32 math rounded to bf16 (relative 2^-7)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from llamalab.inference.row_gemm import row_kernels

    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin) if weights == "int8" else lin
    settings = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP")
    with fresh_cache(), row_kernels() as offered, inductor_config.patch(settings), torch.no_grad():
        assert offered
        y, (code, *_) = run_and_get_code(torch.compile(layer, dynamic=False), x)
    assert ("_rows<1, " in code) == (rows == 1 or weights == "bf16")  # a block's last rows are its tail cases
    block = None if rows == 1 or weights == "int8" else "4, 24" if out_features % 24 == 0 else "2, 32"
    assert [b for b in ("4, 24", "2, 32") if f"_rows<{b}, accum>" in code] == ([block] if block else [])
    if weights == "int8":
        ref = (x.float() @ layer.weight.float().T) * layer.scales.float()
    else:
        ref = x.float() @ lin.weight.float().T
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-5)
