"""Logits equal transformers' LlamaForCausalLM on the same weights, in both directions of the mapping."""

import pytest
import torch

from llamalab.convert.hf import args_from_hf_config, hf_config, hf_to_meta_state, meta_to_hf_state
from llamalab.model import ModelArgs, build_model

transformers = pytest.importorskip("transformers")

CONFIGS = [
    ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=64),
    # grouped-query attention, a vocabulary that is not a power of two, eps and theta off their defaults
    ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=1001, multiple_of=16, norm_eps=1e-5,
              rope_theta=500000.0, max_seq_len=64),
    # multi-query attention and an ffn multiplier
    ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=333, multiple_of=64,
              ffn_dim_multiplier=1.3, max_seq_len=32),
]


def hf_model(args: ModelArgs):
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(args).items() if k not in ("architectures",)})
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


@pytest.mark.parametrize("args", CONFIGS, ids=["mha", "gqa-odd-vocab", "mqa-multiplier"])
def test_ours_to_hf_logits(args):
    torch.manual_seed(0)
    ours = build_model(args, seed=1).eval()
    theirs = hf_model(args)
    theirs.load_state_dict(meta_to_hf_state(ours.state_dict(), args), strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 17))
    with torch.no_grad():
        ref = theirs(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args", CONFIGS, ids=["mha", "gqa-odd-vocab", "mqa-multiplier"])
def test_hf_to_ours_logits(args):
    torch.manual_seed(1)
    theirs = hf_model(args)
    with torch.no_grad():  # HF initialises norms to ones; make them non-trivial too
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    back_args, _ = args_from_hf_config(hf_config(args))
    assert back_args.ffn_hidden_dim == args.ffn_hidden_dim and back_args.kv_heads == args.kv_heads
    ours = build_model(back_args, init=False).eval()
    ours.load_state_dict(hf_to_meta_state(theirs.state_dict(), back_args), strict=True)
    tokens = torch.randint(0, args.vocab_size, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)


def test_missing_permutation_would_be_caught():
    """Without the q/k permutation the logits differ: the parity test above can fail."""
    args = CONFIGS[0]
    ours = build_model(args, seed=1).eval()
    theirs = hf_model(args)
    state = meta_to_hf_state(ours.state_dict(), args)
    state["model.layers.0.self_attn.q_proj.weight"] = ours.state_dict()["layers.0.attention.wq.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = ours.state_dict()["layers.0.attention.wk.weight"]
    theirs.load_state_dict(state)
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max() > 1e-4
