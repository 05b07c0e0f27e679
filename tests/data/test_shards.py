"""The on-disk token format: documents round-trip, shards roll over, uint32 for large vocabularies."""

from __future__ import annotations

import numpy as np
import pytest

from llamalab.data.shards import Shard, ShardWriter, TokenStream, token_dtype


def write(folder, docs, dtype, max_tokens):
    writer = ShardWriter(folder, dtype, max_tokens=max_tokens)
    for d in docs:
        writer.add(d)
    return writer.close(), writer


def test_dtype_follows_vocab_size():
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32


@pytest.mark.parametrize("vocab", [4096, 128256])
def test_documents_round_trip_across_shards(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in rng.integers(1, 400, size=60)]
    docs.insert(10, np.zeros(0, dtype=np.int64))  # an empty document keeps its place
    dtype = token_dtype(vocab)
    names, writer = write(tmp_path, docs, dtype, max_tokens=1000)
    assert len(names) > 5 and writer.documents == len(docs) and writer.tokens == sum(map(len, docs))
    for name in names:  # raw little-endian ids of the right width, one file per shard
        assert (tmp_path / f"{name}.tokens").stat().st_size == Shard(tmp_path / name, dtype).offsets[-1] * dtype.itemsize
    stream = TokenStream([tmp_path / n for n in names], dtype)
    assert stream.num_documents == len(docs)
    for got, want in zip(stream.documents(), docs, strict=True):
        assert np.array_equal(got, want)
    flat = np.concatenate(docs)
    for start, length in [(0, 5), (990, 40), (len(flat) - 7, 7), (123, 2500)]:  # within and across shards
        assert np.array_equal(stream.read(start, length), flat[start:start + length])
    with pytest.raises(IndexError):
        stream.read(len(flat) - 3, 5)


def test_out_of_range_ids_and_damaged_shards_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, token_dtype(1000))
    with pytest.raises(ValueError, match="out of range"):
        writer.add(np.array([1, 70000]))
    writer.add(np.arange(10))
    (name,) = writer.close()
    with open(tmp_path / f"{name}.tokens", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="damaged"):
        Shard(tmp_path / name, token_dtype(1000))
