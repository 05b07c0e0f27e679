"""On-disk token format of a prepared data folder.

A prepared folder holds, per split and source, one or more *shards*: ``<name>.tokens`` (the documents' token ids
back to back, raw little-endian uint16 when the vocabulary fits, else uint32, read through ``numpy.memmap``) and
``<name>.offsets.npy`` (int64, ``n_documents + 1`` entries, document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``).
``manifest.json`` lists the shards and counts; ``COMPLETE`` is written last, and a folder without it is never read.

    prepared/
      manifest.json  tokenizer.model  COMPLETE
      train/books/00000.tokens  train/books/00000.offsets.npy  ...
      validation/books/00000.tokens ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fs import read_json_object

MANIFEST_NAME = "manifest.json"
COMPLETE_NAME = "COMPLETE"
TOKENIZER_NAME = "tokenizer.model"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MiB of uint16 per file


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class ShardWriter:
    """Appends documents to ``folder/NNNNN.tokens`` + offsets, starting a new shard past ``max_tokens``."""

    def __init__(self, folder: str | Path, dtype: np.dtype, max_tokens: int = DEFAULT_SHARD_TOKENS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.max_tokens = max_tokens
        self.shards: list[str] = []
        self.documents = 0
        self.tokens = 0
        self._file = None
        self._offsets: list[int] = []

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype} in {self.folder}")
        if self._file is None or (self._offsets[-1] > 0 and self._offsets[-1] + tokens.size > self.max_tokens):
            self._finish_shard()
            name = f"{len(self.shards):05d}"
            self.shards.append(name)
            self._file = open(self.folder / f"{name}.tokens", "wb")
            self._offsets = [0]
        tokens.astype(self.dtype, copy=False).tofile(self._file)
        self._offsets.append(self._offsets[-1] + tokens.size)
        self.documents += 1
        self.tokens += tokens.size

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        np.save(self.folder / f"{self.shards[-1]}.offsets.npy", np.asarray(self._offsets, dtype=np.int64))
        self._file = None

    def close(self) -> list[str]:
        """Finish the last shard; returns the shard names (relative to ``folder``)."""
        self._finish_shard()
        return list(self.shards)


def split_entry(writer: ShardWriter, num_bytes: int) -> dict:
    """The manifest entry of one source's split: its shards and counts (``bytes`` = UTF-8 text kept)."""
    return {"shards": writer.close(), "documents": writer.documents, "tokens": writer.tokens, "bytes": num_bytes}


def finish_prepared(folder: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` then the ``COMPLETE`` marker, the last file of a prepared folder."""
    folder = Path(folder)
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    (folder / COMPLETE_NAME).write_text("")


class Shard:
    """One memory-mapped shard: ``tokens`` (uint16/uint32) and document ``offsets``."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        prefix = Path(prefix)
        self.offsets = np.load(f"{prefix}.offsets.npy", mmap_mode="r")
        n = int(self.offsets[-1])
        path = Path(f"{prefix}.tokens")
        expected = n * np.dtype(dtype).itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, offsets say {expected}; the shard is damaged")
        # np.memmap refuses empty files; an empty shard has no documents anyway.
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


class TokenStream:
    """The shards of one source and split read as one stream of tokens (documents back to back)."""

    def __init__(self, prefixes: list[Path], dtype: np.dtype):
        self.shards = [Shard(p, dtype) for p in prefixes]
        sizes = [s.tokens.size for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])
        self.num_documents = sum(len(s) for s in self.shards)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (a copy), across shard boundaries if needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {self.num_tokens}")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        shard = self.shards[i].tokens
        if local + length <= shard.size:
            return np.array(shard[local:local + length])
        parts, need = [], length
        while need:
            take = min(need, self.shards[i].tokens.size - local)
            parts.append(self.shards[i].tokens[local:local + take])
            need -= take
            i, local = i + 1, 0
        return np.concatenate(parts)

    def documents(self):
        """Every document's tokens, in order."""
        for shard in self.shards:
            for i in range(len(shard)):
                yield shard.document(i)


class PreparedData:
    """A finished prepared folder: its manifest, tokenizer path and per-source token streams."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / COMPLETE_NAME).is_file():
            raise FileNotFoundError(
                f"{self.folder}: not a complete prepared data folder (no {COMPLETE_NAME} marker); "
                "run `llamalab data prepare` to (re)build it")
        self.manifest = read_json_object(self.folder / MANIFEST_NAME, "a prepared data folder holds manifest.json")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.folder}: prepared with format {self.manifest.get('format_version')}, "
                             f"this llamalab reads {FORMAT_VERSION}; prepare it again")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_path = self.folder / TOKENIZER_NAME

    @property
    def sources(self) -> dict[str, dict]:
        return self.manifest["sources"]

    def proportions(self) -> dict[str, float]:
        return {name: float(s["proportion"]) for name, s in self.sources.items()}

    def split_info(self, source: str, split: str) -> dict:
        try:
            return self.sources[source]["splits"][split]
        except KeyError:
            raise KeyError(f"{self.folder}: no source {source!r} with a {split!r} split; "
                           f"sources are {sorted(self.sources)}") from None

    def stream(self, source: str, split: str) -> TokenStream:
        info = self.split_info(source, split)
        base = self.folder / split / source
        return TokenStream([base / name for name in info["shards"]], self.dtype)
