"""The fast decode path: compiled step, bf16 weights and int8 weight-only quantization against the reference."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import PROMPTS, copy_model, decode_logits, graphs_compiled

from llamalab.generate import blocked_argmax, generate_tokens
from llamalab.inference.backend import accelerate
from llamalab.inference.backend.cache_key import weights_digest
from llamalab.inference.backend.row_kernels import inductor_emits_avx2
from llamalab.inference.backend.stacked import StackedLinear, decode_view
from llamalab.inference.quantize import Int8Linear, quantize_int8, quantize_per_channel
from llamalab.model import build_model


# One compiled backend per dtype for the module, each compiled once per shape (a compile costs 5-30 s here)
@pytest.fixture(scope="module")
def bf16_fast(one_layer):
    return accelerate(copy_model(one_layer, torch.bfloat16), compile=True)


@pytest.fixture(scope="module")
def int8_fast(one_layer):
    return accelerate(quantize_int8(copy_model(one_layer, torch.bfloat16)), compile=True)


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
    also when the attention window grows from 64 to 128 slots. (Two layers, whose caches are views of one block.)"""
    fp32_fast = accelerate(model, compile=True)
    tokens = torch.randint(0, model.args.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    eager = decode_logits(model, tokens, 4)
    with graphs_compiled() as graphs:
        compiled = decode_logits(fp32_fast, tokens, 4)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert graphs == [1]  # one graph for 96 positions

    reference = generate_tokens(model, PROMPTS, max_new_tokens=100)
    with graphs_compiled() as graphs:
        assert generate_tokens(fp32_fast, PROMPTS, max_new_tokens=100) == reference
    assert graphs == [1]  # one greedy graph for 100 positions
    with torch._dynamo.config.patch(error_on_recompile=True):
        # the same shape again (new prompts, other lengths) reuses the compiled step
        assert generate_tokens(fp32_fast, [[1, 5], [1, 6, 7], [1]], max_new_tokens=110) == \
            generate_tokens(model, [[1, 5], [1, 6, 7], [1]], max_new_tokens=110)


def test_compiled_steps_keep_their_own_weights_and_follow_in_place_changes(one_layer):
    """Warm steps skip dynamo's full guard check; a second model of the same shape must still get its own step
    (its own frozen weights), and the first model its own afterwards. The compiled step freezes the weights;
    changing them in place (training, load_state_dict) rebuilds it."""
    other = build_model(one_layer.args, seed=1).eval()
    backends = [accelerate(m, compile=True) for m in (one_layer, other)]
    prompts = PROMPTS  # three rows, as in the other compiled tests: inductor autotunes each product shape once
    expected = [generate_tokens(m, prompts, max_new_tokens=12) for m in (one_layer, other)]
    assert expected[0] != expected[1]
    for _ in range(2):
        assert [generate_tokens(b, prompts, max_new_tokens=12) for b in backends] == expected

    with torch.no_grad():
        other.load_state_dict(build_model(one_layer.args, seed=3).state_dict())
    after = generate_tokens(other, prompts, max_new_tokens=12)
    assert after != expected[1]
    assert generate_tokens(backends[1], prompts, max_new_tokens=12) == after


@pytest.mark.slow
def test_compiled_bf16_models_of_one_shape_keep_their_own_weights(one_layer, bf16_fast):
    """Inductor's FX graph cache keys a frozen graph on the weights' shapes, and serves its packed copies of the
    weights from the cache entry: the second bf16 model of a shape, compiled after the first has filled the
    entry, must still decode with its own weights (it decoded with the first one's before the weights' digest
    joined the key)."""
    tokens = torch.randint(0, one_layer.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    second = accelerate(build_model(one_layer.args, seed=5).eval().to(torch.bfloat16), compile=True)
    for fast in (bf16_fast, second):
        ref = decode_logits(fast.model, tokens, 4)
        assert (decode_logits(fast, tokens, 4) - ref).abs().max() <= 0.03 * ref.std()


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
def test_compiled_bf16_and_int8_paths(one_layer, bf16_fast, int8_fast):
    """bf16 weights: logits within bf16 tolerance of fp32; int8 (bf16 activations): within the int8 bound."""
    tokens = torch.randint(0, one_layer.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(one_layer, tokens, 4)
    spread = ref.std()
    assert (decode_logits(bf16_fast, tokens, 4) - ref).abs().max() <= 0.03 * spread
    assert (decode_logits(int8_fast, tokens, 4) - ref).abs().max() <= 0.08 * spread
    # batched on the fast path equals each prompt alone on the reference (eager) path of the same weights
    batched = generate_tokens(int8_fast, PROMPTS, max_new_tokens=16)
    assert batched == [generate_tokens(int8_fast.model, [p], max_new_tokens=16)[0] for p in PROMPTS]


@pytest.mark.skipif(inductor_emits_avx2(), reason="inductor emits AVX2 code here: the row kernels apply "
                                                  "(test_row_kernels.py)")
def test_row_kernels_step_aside_where_inductor_emits_avx512(int8_fast):
    """The row kernels are AVX2 code: on an AVX-512 CPU the backend says they are off, leaves inductor's own
    micro-kernels in place, and the compiled decode still gives the eager tokens."""
    assert not int8_fast.row_kernels
    assert "row kernels off (written for AVX2; inductor emits avx512" in int8_fast.describe()
    assert generate_tokens(int8_fast, PROMPTS, max_new_tokens=16) == \
        generate_tokens(int8_fast.model, PROMPTS, max_new_tokens=16)


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
    counters = torch._dynamo.utils.counters
    skips = counters["inductor"]["cudagraph_skips"]
    gpu = accelerate(copy_model(model, device="cuda"), compile=True)
    assert gpu.describe().startswith("cuda backend: ")
    tokens = torch.randint(0, model.args.vocab_size, (3, 100), generator=torch.Generator().manual_seed(1))
    eager = decode_logits(model, tokens, 4)
    with graphs_compiled() as graphs:
        compiled = decode_logits(gpu, tokens.cuda(), 4)
    assert graphs == [1]  # one graph for 96 positions
    with graphs_compiled() as graphs:
        assert generate_tokens(gpu, PROMPTS, max_new_tokens=100) == generate_tokens(model, PROMPTS, max_new_tokens=100)
    assert graphs == [1]
    torch.testing.assert_close(compiled.cpu(), eager, rtol=0, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == skips  # graphs were really replayed


@requires_cuda
def test_cuda_graph_bf16_and_int8_paths(model):
    """The bf16 and int8 models on the GPU: logits within the CPU tests' bounds, batched equals per-prompt."""
    tokens = torch.randint(0, model.args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(model, tokens, 4)
    spread = ref.std()
    bf16 = accelerate(copy_model(model, torch.bfloat16, device="cuda"), compile=True)
    assert (decode_logits(bf16, tokens.cuda(), 4).cpu() - ref).abs().max() <= 0.03 * spread
    fast = accelerate(quantize_int8(copy_model(model, torch.bfloat16, device="cuda")), compile=True)
    assert (decode_logits(fast, tokens.cuda(), 4).cpu() - ref).abs().max() <= 0.08 * spread
    batched = generate_tokens(fast, PROMPTS, max_new_tokens=16)
    assert batched == [generate_tokens(fast.model, [p], max_new_tokens=16)[0] for p in PROMPTS]
