"""A tiny prepared data folder (written with the data package's own shard writer) and configs for it."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import tiny_overrides

from llamalab.config import load_config
from llamalab.data.shards import ShardWriter, finish_prepared, split_entry, token_dtype

VOCAB = 256


def write_prepared(folder, train_tokens: int = 30_000, val_tokens: int = 3_000, seed: int = 0):
    """Two sources of documents drawn from a small Markov chain, so a model has something to learn."""
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(VOCAB, 0.05), size=VOCAB)
    dtype = token_dtype(VOCAB)
    sources = {}
    for name, share in (("books", 0.6), ("web", 0.4)):
        splits = {}
        for split, n in (("train", train_tokens), ("validation", val_tokens)):
            writer = ShardWriter(folder / split / name, dtype)
            tokens = np.empty(n, dtype=np.int64)
            tokens[0] = rng.integers(VOCAB)
            uniforms = rng.random(n)
            cdf = transition.cumsum(1)
            for i in range(1, n):
                tokens[i] = min(np.searchsorted(cdf[tokens[i - 1]], uniforms[i]), VOCAB - 1)
            for doc in np.array_split(tokens, max(1, n // 500)):
                writer.add(doc)
            splits[split] = split_entry(writer, num_bytes=4 * n)
        sources[name] = {"proportion": share, "splits": splits}
    finish_prepared(folder, {"dtype": dtype.str, "vocab_size": VOCAB, "sources": sources})
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture
def make_config(prepared, tmp_path):
    """``make_config(*overrides)``: the ``tiny`` model on the tiny data, 8 steps, quiet, in tmp_path/run."""

    def make(*overrides, out="run"):
        return load_config(None, tiny_overrides(prepared, tmp_path / out) + list(overrides))

    return make
