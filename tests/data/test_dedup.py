"""Dedup finds planted exact, line-level and near duplicates and keeps distinct documents."""

from __future__ import annotations

import random

import pytest

from llamalab.data.dedup import ExactDedup, LineDedup, NearDedup


def test_exact_dedup_normalizes_case_and_whitespace():
    dedup = ExactDedup()
    docs = ["The cat sat.\nOn the mat.", "the  CAT sat. on the mat.  ", "The cat sat on the mat.", "Another one."]
    assert [dedup.is_duplicate(d) for d in docs] == [False, True, False, False]
    assert dedup.is_duplicate("ANOTHER ONE.") and not dedup.is_duplicate("Another one!")
    assert not dedup.is_duplicate("\ufb01ne print") and dedup.is_duplicate("fine print")  # NFKC: the ligature


def test_line_dedup_drops_lines_seen_before():
    dedup = LineDedup()
    page1 = "Welcome to our shop!\nFresh bread baked every morning.\n\nCopyright 2019 Shop Inc."
    page2 = "Welcome to our shop!!\nWe also sell cakes.\n\nCopyright 2023 Shop Inc."  # punctuation / digits differ
    page3 = "Completely new text.\nAnd more of it."
    assert dedup.filter(page1) == page1
    assert dedup.filter(page2) == "We also sell cakes.\n"  # blank lines are kept
    assert dedup.filter(page3) == page3
    assert dedup.filter("Repeat me.\nrepeat ME\nRepeat me") == "Repeat me."  # within a document too
    assert dedup.lines_dropped == 4


@pytest.fixture(scope="module")
def book_words():
    from shared_data import shared_path

    return shared_path("raw", "books", "nltk_gutenberg", "austen-emma.txt").read_text(encoding="utf-8").split()


def _edit(words: list[str], fraction: float, seed: int) -> str:
    rng = random.Random(seed)
    words = list(words)
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = f"zz{rng.randrange(10**6)}"
    return " ".join(words)


def test_near_dedup_finds_planted_near_duplicates(book_words):
    chunks = [book_words[i * 3000:(i + 1) * 3000] for i in range(6)]  # six distinct stretches of Emma
    dedup = NearDedup(threshold=0.9)
    assert [dedup.is_duplicate(f"orig{i}", " ".join(c)) for i, c in enumerate(chunks)] == [False] * 6
    # 0.3% of the words changed: about 98% of the 5-gram shingles survive -> a near duplicate
    assert dedup.is_duplicate("copy0", _edit(chunks[0], 0.003, seed=1))
    assert dedup.is_duplicate("copy3", " ".join(chunks[3]).upper())  # normalization
    # 5% of the words changed: Jaccard about 0.6, below the 0.9 threshold -> kept (and indexed)
    assert not dedup.is_duplicate("edit1", _edit(chunks[1], 0.05, seed=2))
    # an overlapping but shifted window shares only half its text
    assert not dedup.is_duplicate("half", " ".join(book_words[1500:4500]))
    loose = NearDedup(threshold=0.5)
    loose.is_duplicate("orig", " ".join(chunks[2]))
    assert loose.is_duplicate("edit", _edit(chunks[2], 0.05, seed=3))
    assert not loose.is_duplicate("other", " ".join(chunks[4]))


def test_near_dedup_short_texts_and_repeated_ids():
    dedup = NearDedup(threshold=0.9, num_perm=64)
    assert not dedup.is_duplicate("a", "short text")
    assert dedup.is_duplicate("b", "Short text.")
    assert not dedup.is_duplicate("a", "a different short text")  # a repeated id is not an error
    with pytest.raises(ValueError, match="threshold"):
        NearDedup(threshold=0)
