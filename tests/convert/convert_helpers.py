"""Helpers for conversion tests: small random native folders with a real SentencePiece tokenizer."""

from __future__ import annotations

from llamalab.checkpoint import save_pretrained
from llamalab.model import ModelArgs, build_model

TOK512 = ("weights", "stories260K", "tok512.reconstructed.model")

# grouped-query attention, an FFN size that needs a multiplier, eps and theta off their defaults
RANDOM_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=20000.0, max_seq_len=128)


def random_native(folder, shared_path, args: ModelArgs = RANDOM_ARGS, seed: int = 0, scale: float = 1.0):
    """A native folder with random weights (norm gains too) and the 512-piece stories tokenizer.

    ``scale`` multiplies the matrices: large values give peaked logits, so greedy decoding has clear winners.
    """
    import torch

    model = build_model(args, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.mul_(scale)
    tok = shared_path(*TOK512) if args.vocab_size == 512 else None
    return save_pretrained(folder, model.eval(), tokenizer_path=tok)


def assert_same_tensors(a_dir, b_dir):
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch_equal(a[k], b[k]), k


def torch_equal(x, y) -> bool:
    import torch

    return x.shape == y.shape and bool(torch.equal(x, y))
