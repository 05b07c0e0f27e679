"""llama2.c ``.bin`` headers are read without touching the weights behind them, and a short file is refused."""

from __future__ import annotations

import os
import resource
import time

import pytest

from llamalab.convert.llama2c import HEADER, read_header, read_llama2c

# LLaMA 7B with a tied classifier: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
LLAMA_7B = (4096, 11008, 32, 32, 32, 32000, 2048)
LLAMA_7B_WEIGHT_BYTES = 4 * (32000 * 4096 + 32 * (2 * 4096 + 4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096
                             + 2048 * 128)  # embedding, layers, final norm, RoPE tables
SIZE = 3 << 30


def sparse_bin(path):
    """A 3 GiB file (sparse: no disk used) with a valid 7B header: any read of it all shows in time and RSS."""
    path.write_bytes(HEADER.pack(*LLAMA_7B))
    os.truncate(path, SIZE)
    return path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def test_header_of_a_3gb_file_reads_only_the_header(tmp_path):
    path = sparse_bin(tmp_path / "big.bin")
    rss, started = peak_rss_mib(), time.perf_counter()
    args, shared_classifier = read_header(path)
    assert time.perf_counter() - started < 1.0 and peak_rss_mib() - rss < 100
    assert (args.dim, args.ffn_hidden_dim, args.n_layers, args.vocab_size, args.max_seq_len) == (
        4096, 11008, 32, 32000, 2048)
    assert shared_classifier


def test_truncated_bin_names_the_file_and_both_sizes(tmp_path):
    path = sparse_bin(tmp_path / "cut.bin")
    rss = peak_rss_mib()
    with pytest.raises(ValueError, match=rf"cut.bin: {SIZE - HEADER.size} bytes of weights, expected "
                                         rf"{LLAMA_7B_WEIGHT_BYTES} .*the file is truncated"):
        read_llama2c(path)
    assert peak_rss_mib() - rss < 100
