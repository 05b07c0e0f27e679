"""Helpers the training tests import by name (``conftest`` itself cannot be imported: every test folder has one)."""

from __future__ import annotations

import numpy as np

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


def tiny_overrides(prepared, out_dir) -> list[str]:
    """``--section.key value`` pairs for the ``tiny`` model on the tiny data: 8 steps, quiet, fp32."""
    return ["--model.preset", "tiny", "--data.prepared", str(prepared), "--data.seq_len", "32",
            "--data.val_batches", "2", "--batch.global_tokens", "256", "--batch.micro_batch", "4",
            "--length.steps", "8", "--schedule.warmup_steps", "2", "--optimizer.lr", "3e-3",
            "--run.out_dir", str(out_dir), "--logging.every", "1", "--logging.progress", "false",
            "--logging.tensorboard", "false", "--logging.plot", "false", "--logging.peak_tflops", "1",
            "--checkpoint.every", "4", "--checkpoint.save_final", "false", "--precision.mode", "fp32"]
