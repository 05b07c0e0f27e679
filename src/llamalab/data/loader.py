"""Training batches from a prepared folder: a seeded mixture of sources, split across data-parallel ranks.

Each source's token stream (documents back to back, as LLaMA trains) is cut into windows of ``seq_len + 1``
tokens that start ``seq_len`` apart, so consecutive windows share one token and every token is a target once per
epoch. Every epoch of a source draws a fresh permutation of its windows and a fresh start shift in
``[0, seq_len)``, so no two epochs cut the text alike. The source of each sequence of a *global* batch
(``batch_size * world_size`` rows) is drawn from the proportions with a generator seeded by ``(seed, step)``;
every rank computes the same global batch plan and materializes only its own rows, so ``world_size`` ranks
together see exactly what one rank with a ``world_size`` times larger batch sees, and the loader state (step and
windows consumed per source) is the same on every rank.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from .shards import PreparedData, TokenStream

IGNORE_INDEX = -100  # F.cross_entropy's default: a target that takes no loss (a prompt token, padding)

STATE_VERSION = 1


def _source_key(name: str) -> int:
    """A stable integer per source name, so a source's shuffles do not change when others are added."""
    return zlib.crc32(name.encode("utf-8"))


class _SourceWindows:
    """The shuffled windows of one source, epoch after epoch."""

    def __init__(self, name: str, stream: TokenStream, seq_len: int, seed: int):
        self.name, self.stream, self.seq_len, self.seed = name, stream, seq_len, seed
        if stream.num_tokens < seq_len + 1:
            raise ValueError(f"source {name!r} has {stream.num_tokens} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; lower seq_len or give it more text")
        self.max_shift = min(seq_len, stream.num_tokens - seq_len)
        self.windows_per_epoch = (stream.num_tokens - self.max_shift) // seq_len
        self._epoch: tuple[int, np.ndarray, int] | None = None

    def _plan(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, _source_key(self.name), epoch])
            self._epoch = (epoch, rng.permutation(self.windows_per_epoch), int(rng.integers(self.max_shift)))
        return self._epoch[1], self._epoch[2]

    def window(self, k: int) -> np.ndarray:
        """The k-th window this source hands out since the start of training."""
        epoch, j = divmod(k, self.windows_per_epoch)
        perm, shift = self._plan(epoch)
        return self.stream.read(shift + int(perm[j]) * self.seq_len, self.seq_len + 1)


def _normalized(proportions: dict[str, float], available: dict, where: Path) -> dict[str, float]:
    unknown = sorted(set(proportions) - set(available))
    if unknown:
        raise KeyError(f"{where}: proportions name unknown sources {unknown}; sources are {sorted(available)}")
    if any(p < 0 for p in proportions.values()):
        raise ValueError(f"proportions must be >= 0, got {proportions}")
    kept = {name: float(p) for name, p in proportions.items() if p > 0}
    if not kept:
        raise ValueError(f"{where}: every source has proportion 0")
    total = sum(kept.values())
    return {name: p / total for name, p in sorted(kept.items())}


class MixtureLoader:
    """Infinite iterator of ``(batch_size, seq_len + 1)`` LongTensors (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""

    def __init__(self, prepared_dir: str | Path, *, split: str = "train", batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, proportions: dict[str, float] | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data = PreparedData(prepared_dir)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = batch_size * world_size
        self.proportions = _normalized(proportions if proportions is not None else self.data.proportions(),
                                       self.data.sources, self.data.folder)
        self.names = list(self.proportions)
        self._probs = np.array([self.proportions[n] for n in self.names])
        self.sources = [_SourceWindows(n, self.data.stream(n, split), seq_len, seed) for n in self.names]
        self.step = 0
        self.consumed = [0] * len(self.names)

    def __iter__(self):
        return self

    def batch_sources(self, step: int) -> np.ndarray:
        """Source index of each row of global batch ``step`` (the same on every rank)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(len(self.names), size=self.global_batch_size, p=self._probs)

    def __next__(self) -> torch.Tensor:
        plan = self.batch_sources(self.step)
        first = self.rank * self.batch_size
        taken = list(self.consumed)
        rows = []
        for i, s in enumerate(plan):
            if first <= i < first + self.batch_size:
                rows.append(self.sources[s].window(taken[s]))
            taken[s] += 1
        self.consumed = taken
        self.step += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def epochs(self) -> dict[str, float]:
        """Passes made over each source so far (the paper's "epochs" column, as consumed)."""
        return {n: c / s.windows_per_epoch for n, c, s in zip(self.names, self.consumed, self.sources)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "split": self.split,
                "proportions": dict(self.proportions), "consumed": dict(zip(self.names, self.consumed))}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off; the layout may change (world_size) but not the global batch."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch_size", "split", "proportions"):
            ours, theirs = mine[key], state[key]
            if key == "proportions":
                same = ours.keys() == theirs.keys() and all(abs(ours[k] - theirs[k]) < 1e-12 for k in ours)
            else:
                same = ours == theirs
            if not same:
                raise ValueError(f"loader state was saved with {key}={theirs!r} but this loader has {ours!r}; "
                                 "a resumed run must keep the data settings")
        self.step = int(state["step"])
        self.consumed = [int(state["consumed"][n]) for n in self.names]


def held_out_share(items, *, batch_size: int, max_batches: int | None, batch_rows: int | None, rank: int,
                   world_size: int):
    """(held-out set, this rank's share, batches per rank): the first ``max_batches * batch_rows`` items (all of
    them when fewer, or when ``max_batches`` is None; ``batch_rows`` defaults to ``batch_size``), split into
    consecutive shares of ``ceil(n / world_size)``, each evaluated in ``ceil(share / batch_size)`` batches of
    ``batch_size`` rows. The held-out set does not depend on the layout (``world_size``, ``batch_size``)."""
    if batch_size < 1 or (batch_rows is not None and batch_rows < 1):
        raise ValueError(f"batch_size and batch_rows must be >= 1, got {batch_size} and {batch_rows}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if max_batches is not None:
        items = items[:max_batches * (batch_rows or batch_size)]
    share = -(-len(items) // world_size)
    return items, items[rank * share:(rank + 1) * share], -(-share // batch_size)


class ValidationSet:
    """Deterministic held-out rows over every source's validation split, and bytes per token.

    Windows of ``seq_len + 1`` tokens start ``seq_len`` apart, so each held-out token is predicted once. They are
    interleaved across sources in a fixed shuffled order, so a prefix of that order is a token-weighted sample of
    the mixture. The held-out set is the first ``max_batches * batch_rows`` windows of that order (all of them
    when there are fewer, or when ``max_batches`` is None): ``batch_rows`` is the unit of ``max_batches``, in rows,
    and does not depend on the layout (the trainer passes the training global batch, ``batch.global_tokens /
    seq_len`` sequences; it defaults to ``batch_size``). So every layout -- ``world_size``, ``batch_size`` --
    evaluates exactly the same windows.

    ``world_size`` ranks split those rows into consecutive shares of ``ceil(rows / world_size)``; each rank yields
    its share in batches of exactly ``batch_size`` rows, as many on every rank (``len``). A batch that is not all
    held-out rows (the end of a share, or a rank with nothing left) is topped up with padding rows and comes as an
    ``(inputs, targets)`` pair whose padding targets are ``IGNORE_INDEX`` (-100), so they take no loss; full
    batches are ``(batch_size, seq_len + 1)`` LongTensors. The mean loss is then the token-weighted mean over
    exactly the held-out windows: sum the losses and the counts of targets not ignored over every rank and divide.
    """

    def __init__(self, prepared_dir: str | Path, seq_len: int, batch_size: int, max_batches: int | None = None,
                 *, rank: int = 0, world_size: int = 1, batch_rows: int | None = None):
        self.data = PreparedData(prepared_dir)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.streams, windows = [], []
        for name in sorted(self.data.sources):
            info = self.data.sources[name]["splits"].get("validation")
            if not info or info["tokens"] < seq_len + 1:
                continue
            stream = self.data.stream(name, "validation")
            n = (stream.num_tokens - 1) // seq_len
            windows.append(np.stack([np.full(n, len(self.streams)), np.arange(n) * seq_len], axis=1))
            self.streams.append((name, stream, info["bytes"] / info["tokens"]))
        if not windows:
            raise ValueError(f"{self.data.folder}: no source has a validation split of at least {seq_len + 1} "
                             "tokens; raise validation_fraction or lower seq_len")
        order = np.concatenate(windows)[np.random.default_rng(0).permutation(sum(len(w) for w in windows))]
        self.windows, self.rows, self.num_batches = held_out_share(  # this rank's rows may be short or empty
            order, batch_size=batch_size, max_batches=max_batches, batch_rows=batch_rows, rank=rank,
            world_size=world_size)
        ratio = np.array([r for _, _, r in self.streams])
        self.bytes_per_token = float(ratio[self.windows[:, 0]].mean()) if len(self.windows) else float("nan")
        self.num_tokens = len(self.windows) * seq_len

    def __len__(self) -> int:
        return self.num_batches

    def batches(self):
        for b in range(self.num_batches):
            rows = self.rows[b * self.batch_size:(b + 1) * self.batch_size]
            real = [self.streams[s][1].read(int(start), self.seq_len + 1) for s, start in rows]
            tokens = np.zeros((self.batch_size, self.seq_len + 1), dtype=np.int64)
            if real:
                tokens[:len(real)] = np.stack(real)
            tokens = torch.from_numpy(tokens)
            if len(real) == self.batch_size:
                yield tokens
                continue
            targets = tokens[:, 1:].clone()
            targets[len(real):] = IGNORE_INDEX
            yield tokens[:, :-1], targets

    def __iter__(self):
        return self.batches()
