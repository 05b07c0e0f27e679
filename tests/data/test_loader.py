"""MixtureLoader and ValidationSet on synthetic prepared folders whose token ids reveal their source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamalab.data.loader import MixtureLoader, ValidationSet
from llamalab.data.shards import ShardWriter, finish_prepared, split_entry, token_dtype
from llamalab.parallel.runtime import split_batch

SPAN = 1000  # source i uses token ids [i * SPAN, (i + 1) * SPAN)


def make_prepared(folder, sizes: dict[str, int], proportions: dict[str, float], val_tokens: int = 0,
                  max_shard_tokens: int = 1 << 20, seed: int = 0):
    """Sources of random documents; ids of source i lie in [i*SPAN, (i+1)*SPAN); returns the streams."""
    rng = np.random.default_rng(seed)
    dtype = token_dtype(SPAN * len(sizes))
    sources, streams = {}, {}
    for i, (name, n_tokens) in enumerate(sizes.items()):
        splits = {}
        for split, n in (("train", n_tokens), ("validation", val_tokens)):
            if not n:
                continue
            writer = ShardWriter(folder / split / name, dtype, max_tokens=max_shard_tokens)
            tokens = rng.integers(i * SPAN, (i + 1) * SPAN, size=n)
            cuts = np.sort(rng.choice(np.arange(1, n), size=max(1, n // 300), replace=False))
            for doc in np.split(tokens, cuts):
                writer.add(doc)
            splits[split] = split_entry(writer, num_bytes=3 * n)
            streams[(name, split)] = tokens
        sources[name] = {"proportion": proportions[name], "splits": splits}
    finish_prepared(folder, {"dtype": dtype.str, "vocab_size": SPAN * len(sizes), "sources": sources})
    return streams


def row_sources(batch: torch.Tensor) -> np.ndarray:
    src = (batch // SPAN).numpy()
    assert (src == src[:, :1]).all(), "a row mixes sources"
    return src[:, 0]


@pytest.fixture
def mixture(tmp_path):
    sizes = {"books": 20_000, "code": 7_000, "wiki": 40_000}
    props = {"books": 0.5, "code": 0.2, "wiki": 0.3}
    streams = make_prepared(tmp_path, sizes, props, val_tokens=3_000, max_shard_tokens=4_096)
    return tmp_path, streams, props


def test_rows_are_windows_of_the_source_stream(mixture):
    folder, streams, _ = mixture
    loader = MixtureLoader(folder, batch_size=4, seq_len=64, seed=3)
    names = sorted(streams_name for streams_name, split in streams if split == "train")
    for _ in range(30):  # shards are 4096 tokens, so some windows straddle two shards
        batch = next(loader)
        assert batch.shape == (4, 65) and batch.dtype == torch.long
        for row, s in zip(batch.numpy(), row_sources(batch)):
            stream = streams[(names[s], "train")]
            hits = np.flatnonzero(stream[:-64] == row[0])
            assert any((stream[h:h + 65] == row).all() for h in hits)


def test_source_shares_match_proportions(mixture):
    folder, _, props = mixture
    loader = MixtureLoader(folder, batch_size=16, seq_len=32, seed=0)
    counts = np.bincount(np.concatenate([row_sources(next(loader)) for _ in range(400)]), minlength=3)
    shares = counts / counts.sum()
    for share, name in zip(shares, sorted(props)):
        assert abs(share - props[name]) < 0.02, (name, share)
    # the 7k-token code source was cycled through several epochs, each a fresh shuffle
    assert loader.epochs()["code"] > 3


def test_each_epoch_covers_every_window_once(tmp_path):
    make_prepared(tmp_path, {"only": 1_000}, {"only": 1.0})
    loader = MixtureLoader(tmp_path, batch_size=1, seq_len=10, seed=1)
    per_epoch = loader.sources[0].windows_per_epoch
    epochs = [torch.cat([next(loader) for _ in range(per_epoch)]) for _ in range(2)]
    for e in epochs:  # within an epoch the windows are distinct and evenly spaced (no overlap beyond one token)
        assert len({tuple(r.tolist()) for r in e}) == per_epoch
    assert not torch.equal(epochs[0], epochs[1])  # re-shuffled (and re-cut) each epoch


def test_state_round_trip_gives_identical_next_batches(mixture):
    folder, _, _ = mixture
    loader = MixtureLoader(folder, batch_size=4, seq_len=32, seed=7)
    for _ in range(57):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(20)]
    resumed = MixtureLoader(folder, batch_size=4, seq_len=32, seed=7)
    import json
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is JSON-able
    for want in expected:
        assert torch.equal(next(resumed), want)
    fresh = MixtureLoader(folder, batch_size=4, seq_len=32, seed=7)
    assert not torch.equal(next(fresh), expected[0])


def test_state_rejects_changed_data_settings(mixture):
    folder, _, _ = mixture
    state = MixtureLoader(folder, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        MixtureLoader(folder, batch_size=4, seq_len=16).load_state_dict(state)


def test_ranks_partition_the_global_batch(mixture):
    folder, _, _ = mixture
    single = MixtureLoader(folder, batch_size=6, seq_len=16, seed=5)
    ranks = [MixtureLoader(folder, batch_size=2, seq_len=16, seed=5, rank=r, world_size=3) for r in range(3)]
    for step in range(10):
        if step == 5:  # resume rank layouts from a one-process state: same global batch, same data
            for r in ranks:
                r.load_state_dict(single.state_dict())
        assert torch.equal(torch.cat([next(r) for r in ranks]), next(single))


def test_proportions_override_and_errors(mixture):
    folder, _, _ = mixture
    loader = MixtureLoader(folder, batch_size=8, seq_len=16, proportions={"code": 1, "books": 0})
    assert set(row_sources(next(loader))) == {1}
    with pytest.raises(KeyError, match="nope"):
        MixtureLoader(folder, batch_size=8, seq_len=16, proportions={"nope": 1})
    with pytest.raises(ValueError, match="fewer than seq_len"):
        MixtureLoader(folder, batch_size=1, seq_len=10_000)


def test_incomplete_folder_is_refused(mixture):
    folder, _, _ = mixture
    (folder / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        MixtureLoader(folder, batch_size=1, seq_len=8)


def held_out_rows(val: ValidationSet) -> torch.Tensor:
    """The (n, seq_len + 1) held-out rows a ValidationSet yields, without the padding rows of padded batches."""
    rows = []
    for batch in val.batches():
        if isinstance(batch, torch.Tensor):
            rows.append(batch)
            continue
        inputs, targets = batch
        real = (targets != -100).all(1)
        assert (targets[~real] == -100).all()
        rows.append(torch.cat([inputs, targets[:, -1:]], 1)[real])
    return torch.cat(rows)


def test_validation_set_covers_heldout_tokens_once(mixture):
    folder, streams, _ = mixture
    val = ValidationSet(folder, seq_len=50, batch_size=8)
    rows = held_out_rows(val)
    assert len(val) == -(-rows.shape[0] // 8) and rows.shape[0] == 3 * ((3_000 - 1) // 50)
    assert all(split_batch(b)[0].shape == (8, 50) for b in val.batches())  # the last one padded
    # every source's targets are its held-out tokens, each exactly once
    for s, name in enumerate(sorted({n for n, _ in streams})):
        mine = rows[row_sources(rows) == s]
        targets = np.sort(mine[:, 1:].reshape(-1).numpy())
        want = streams[(name, "validation")][1:1 + 50 * ((3_000 - 1) // 50)]
        assert np.array_equal(targets, np.sort(want))
    assert val.bytes_per_token == pytest.approx(3.0)
    assert held_out_rows(ValidationSet(folder, 50, 8)).equal(rows)
    limited = ValidationSet(folder, seq_len=50, batch_size=8, max_batches=2)
    assert len(list(limited.batches())) == 2 and held_out_rows(limited).equal(rows[:16])
    # two ranks share the same held-out rows (max_batches counts batches of batch_rows rows, not per rank)
    halves = [ValidationSet(folder, 50, 4, rank=r, world_size=2, batch_rows=8) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == -(-rows.shape[0] // 8)
    assert torch.cat([held_out_rows(h) for h in halves]).equal(rows)
    limited = [ValidationSet(folder, 50, 4, max_batches=2, rank=r, world_size=2, batch_rows=8) for r in range(2)]
    assert torch.cat([held_out_rows(h) for h in limited]).equal(rows[:16])
