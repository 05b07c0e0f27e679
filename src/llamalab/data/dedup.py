"""Deduplication at three granularities, each keeping its state across calls (one instance per corpus/source).

- :class:`ExactDedup`: a document whose normalized text was seen before is a duplicate.
- :class:`LineDedup`: CCNet-style (Wenzek et al., 2020): lines whose normalized hash was seen before are dropped.
- :class:`NearDedup`: MinHash LSH over word n-grams (datasketch); LLaMA drops books with more than 90% overlap.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

_WS = re.compile(r"\s+")
_DIGIT = re.compile(r"\d")
_PUNCT = re.compile(r"[^\w\s]|_")  # punctuation and symbols, any script


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _nfkc(text: str) -> str:
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def normalize_text(text: str) -> str:
    """Text as compared by exact dedup: Unicode NFKC, lower case, whitespace runs collapsed."""
    return " ".join(_nfkc(text).lower().split())


def normalize_line(line: str) -> str:
    """CCNet's line normalization: lower case, digits to 0, punctuation (and symbols) removed, whitespace
    collapsed."""
    return " ".join(_PUNCT.sub("", _DIGIT.sub("0", _nfkc(line).lower())).split())


class ExactDedup:
    """``is_duplicate(text)`` is True when the same normalized text was seen before (and remembers it)."""

    def __init__(self):
        self.seen: set[int] = set()

    def is_duplicate(self, text: str) -> bool:
        key = _hash64(normalize_text(text))
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


class LineDedup:
    """``filter(text)`` drops every line whose normalized form was already seen in the corpus (earlier in the
    same document included), as CCNet does for web shards. Lines that normalize to fewer than ``min_chars``
    characters (blank lines, lone braces) are always kept."""

    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars
        self.seen: set[int] = set()
        self.lines_dropped = 0

    def filter(self, text: str) -> str:
        kept = []
        for line in text.split("\n"):
            norm = normalize_line(line)
            if len(norm) < self.min_chars:
                kept.append(line)
                continue
            key = _hash64(norm)
            if key in self.seen:
                self.lines_dropped += 1
                continue
            self.seen.add(key)
            kept.append(line)
        return "\n".join(kept)


def shingles(text: str, ngram: int) -> list[bytes]:
    """Word ``ngram``-grams of the normalized text (the whole text when it is shorter)."""
    words = normalize_line(text).split()  # one pass over the whole text
    if len(words) <= ngram:
        return [" ".join(words).encode()]
    return [" ".join(words[i: i + ngram]).encode() for i in range(len(words) - ngram + 1)]


_BATCH = 8192


class NearDedup:
    """MinHash LSH near-duplicate detection: ``is_duplicate(doc_id, text)`` is True when an earlier document's
    estimated Jaccard similarity of word ``ngram`` shingles is at least ``threshold``; otherwise the document is
    indexed. LSH candidates are confirmed with the MinHash estimate, so bucket collisions do not drop documents."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        from datasketch import MinHash

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, np.ndarray] = {}
        # drawing the permutations is most of a MinHash's cost: draw them once and share them
        template = MinHash(num_perm=num_perm, seed=seed)
        self._permutations, self._scheme = template.permutations, template.scheme

    def minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed, permutations=self._permutations,
                    scheme=self._scheme, hashfunc=zlib.crc32)  # crc32: a 32-bit hash much cheaper than sha1
        grams = list(dict.fromkeys(shingles(text, self.ngram)))  # unique, in a stable order
        for i in range(0, len(grams), _BATCH):  # bounded temporaries: num_perm x _BATCH uint64 per step
            m.update_batch(grams[i: i + _BATCH])
        return m

    def is_duplicate(self, doc_id: str, text: str) -> bool:
        m = self.minhash(text)
        for other in self.lsh.query(m):
            if np.mean(self.signatures[other] == m.hashvalues) >= self.threshold:
                return True
        key = str(doc_id)
        if key in self.signatures:  # ids need not be unique across sources
            key = f"{key}#{len(self.signatures)}"
        self.lsh.insert(key, m)
        self.signatures[key] = m.hashvalues
        return False
