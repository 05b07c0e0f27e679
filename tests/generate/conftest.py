"""Tiny models and a tiny byte-fallback SentencePiece tokenizer, built in the test session (no shared data)."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm

from llamalab.model import ModelArgs, build_model
from llamalab.tokenizer import Tokenizer

TEXT = [
    "Once upon a time there was a little girl named Lily who loved to play in the park.",
    "She saw a big red ball and wanted to play with it, but it was too high.",
    "The cat sat on the mat. The dog ran after the ball. They were happy friends.",
    "Café, naïve, piñata: words with accents. 你好, 世界. Ünïcödé ☃ ok.",
] * 20


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A 320-piece BPE model with byte fallback, so generated tokens include raw UTF-8 byte pieces."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=out, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return Tokenizer(path)


def make_tiny_args(vocab_size: int = 320, **overrides) -> ModelArgs:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                  norm_eps=1e-5, max_seq_len=128)
    fields.update(overrides)
    return ModelArgs(**fields)


@pytest.fixture(scope="session")
def model():
    """Grouped-query attention, random weights (seeded), fp32, the tokenizer's vocabulary."""
    return build_model(make_tiny_args(), seed=0).eval()


@pytest.fixture(scope="session")
def one_layer():
    """The same with one layer: the compiled tests' model where the number of layers is not the point (the step's
    C++, compiled anew for every model, then takes about half as long)."""
    return build_model(make_tiny_args(n_layers=1), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_args():
    """The tiny model's ModelArgs with some fields replaced."""
    return make_tiny_args


