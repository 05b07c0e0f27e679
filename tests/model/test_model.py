import copy

import pytest
import torch

from llamalab.generate import Decoder
from llamalab.model import PRESETS, ConfigError, ModelArgs, build_model, preset_args
from llamalab.model.args import ffn_params_for_hidden
from llamalab.parallel.pipeline import stage_module

PAPER = {  # Table 2 of the paper: dim, heads, layers, lr, tokens; FFN hidden and billions of parameters
    "llama-7b": (4096, 32, 32, 3.0e-4, 1.0e12, 11008, 6.7),
    "llama-13b": (5120, 40, 40, 3.0e-4, 1.0e12, 13824, 13.0),
    "llama-33b": (6656, 52, 60, 1.5e-4, 1.4e12, 17920, 32.5),
    "llama-65b": (8192, 64, 80, 1.5e-4, 1.4e12, 22016, 65.2),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_table_2(name):
    dim, heads, layers, lr, tokens, hidden, billions = PAPER[name]
    preset = PRESETS[name]
    a = preset.args
    assert (a.dim, a.n_heads, a.n_layers, a.vocab_size, a.norm_eps, a.multiple_of, a.max_seq_len) == (
        dim, heads, layers, 32000, 1e-6, 256, 2048)
    assert a.ffn_hidden_dim == hidden
    assert preset.recipe.lr == lr and preset.recipe.token_budget == tokens
    assert preset.recipe.batch_tokens == 4 * 2**20 and preset.recipe.warmup_steps == 2000
    with torch.device("meta"):
        from llamalab.model import Transformer

        model = Transformer(a)
    n = sum(p.numel() for p in model.parameters())
    assert n == a.num_params()
    # the paper rounds down (65.29B is reported as 65.2B)
    assert billions <= n / 1e9 < billions + 0.1, n


def test_cpu_presets():
    assert (PRESETS["stories15m"].args.dim, PRESETS["stories15m"].args.n_layers, PRESETS["stories15m"].args.n_heads,
            PRESETS["stories15m"].args.max_seq_len) == (288, 6, 6, 256)
    assert (PRESETS["small"].args.dim, PRESETS["small"].args.n_layers, PRESETS["small"].args.n_heads,
            PRESETS["small"].args.max_seq_len) == (768, 12, 12, 1024)
    assert PRESETS["tiny"].args.num_params() < 10**6


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dim=100, n_heads=3), "n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(ffn_dim_multiplier=0.0), "ffn_dim_multiplier"),
        (dict(dim=36, n_heads=4), "even"),
    ],
)
def test_invalid_args_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelArgs(**kwargs)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelArgs.from_dict({"dim": 64, "hidden_size": 3})
    with pytest.raises(ConfigError, match="nope"):
        preset_args("tiny", nope=1)


def test_ffn_hidden_round_trip():
    for dim, hidden in [(64, 172), (4096, 11008), (288, 768), (4096, 14336)]:
        multiple_of, mult = ffn_params_for_hidden(dim, hidden)
        assert ModelArgs(dim=dim, n_heads=2, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden_dim == hidden


def test_causal_and_seeded_init():
    args = preset_args("tiny")
    a = build_model(args, seed=0)
    b = build_model(args, seed=0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    full = a(tokens)
    prefix = a(tokens[:, :9])
    # position t sees only tokens <= t
    torch.testing.assert_close(full[:, :9], prefix, rtol=1e-5, atol=1e-5)
    assert full.shape == (2, 16, args.vocab_size)


def test_logits_at_one_index_per_row():
    args = preset_args("tiny")
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (3, 12))
    at = torch.tensor([11, 0, 6])
    picked = model(tokens, logits_at=at)
    assert picked.shape == (3, 1, args.vocab_size)
    torch.testing.assert_close(picked[:, 0], model(tokens)[torch.arange(3), at], rtol=1e-5, atol=1e-5)


def test_rope_tables_stay_fp32_in_bf16_model():
    model = build_model(preset_args("tiny"), dtype=torch.bfloat16, seed=0)
    assert model.rope_cos.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    ref = build_model(preset_args("tiny"), seed=0)
    torch.testing.assert_close(model.rope_sin, ref.rope_sin)


def test_forward_is_output_of_hidden_states():
    args = preset_args("tiny")
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 10))

    def from_hidden(*a, **k):
        return model.output(model.hidden_states(*a, **k))

    assert torch.equal(model(tokens), from_hidden(tokens))
    at = torch.tensor([9, 3])
    assert torch.equal(model(tokens, logits_at=at), from_hidden(tokens, at=at))

    @torch.inference_mode()
    def prefill_then_step(fn):
        """A prefill and one decode step through generate's caches (the documented cache protocol)."""
        caches = Decoder(model, batch_size=2, cache_len=16).caches
        slots, outs = torch.arange(16), []
        for toks, pos in ((tokens, torch.arange(10).expand(2, -1)), (tokens[:, :1], torch.full((2, 1), 10))):
            outs.append(fn(toks, pos, caches, (slots <= pos[:, :, None])[:, None]))
        return outs

    (prefill, step), (prefill_h, step_h) = prefill_then_step(model), prefill_then_step(from_hidden)
    assert torch.equal(prefill, prefill_h) and torch.equal(step, step_h)
    torch.testing.assert_close(step[:, 0], model(torch.cat([tokens, tokens[:, :1]], 1))[:, -1], rtol=1e-5, atol=1e-5)


def test_hidden_states_are_the_normed_output_of_the_blocks():
    """The loop the evaluation harness ran itself before the model had ``hidden_states``."""
    args = preset_args("tiny")
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    h = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        h = layer(h, model.rope_cos[:10], model.rope_sin[:10])
    assert torch.equal(model.hidden_states(tokens), model.norm(h))


def test_pipeline_stages_chain_to_the_whole_model():
    """A stage without embedding, norm or output layer passes hidden states through those steps."""
    args = preset_args("tiny")
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    first = stage_module(copy.deepcopy(model), range(0, 1), first=True, last=False)
    last = stage_module(copy.deepcopy(model), range(1, 2), first=False, last=True)
    assert torch.equal(last(first(tokens)), model(tokens))
