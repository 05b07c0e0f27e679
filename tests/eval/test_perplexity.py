"""Perplexity of a known model on a known text equals a direct computation from full forward passes."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.eval.harness import Evaluator
from llamalab.eval.perplexity import perplexity, perplexity_file
from llamalab.model import ModelArgs, build_model

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. Ça va? ")


@pytest.fixture(scope="module")
def setup():
    from llamalab.tokenizer import Tokenizer
    from shared_data import shared_path

    tok = Tokenizer(shared_path("weights", "stories260K", "tok512.reconstructed.model"))
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64)
    return build_model(args, seed=3).eval(), tok


def direct_sum(model, seq: list[int], start: int, end: int) -> float:
    """log P(seq[start:end] | seq[:start]) from one forward pass over seq[:end] (which must fit the model)."""
    with torch.no_grad():
        logp = model(torch.tensor([seq[: end - 1]])).log_softmax(-1)[0]
    return sum(float(logp[i - 1, seq[i]]) for i in range(start, end))


def test_whole_text_in_one_window(setup):
    model, tok = setup
    tokens = tok.encode(TEXT[:120], bos=False)
    assert len(tokens) < 64
    report = perplexity(Evaluator(model, tok, progress=False), TEXT[:120])
    ll = direct_sum(model, [tok.bos_id] + tokens, 1, len(tokens) + 1)
    assert report["tokens"] == len(tokens)
    assert report["nats_per_token"] == pytest.approx(-ll / len(tokens), abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(-ll / len(tokens)), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(-ll / math.log(2) / len(TEXT[:120].encode()), abs=1e-5)


def test_disjoint_windows_equal_chunked_forward(setup):
    model, tok = setup
    tokens = tok.encode(TEXT * 3, bos=False)
    seq = [tok.bos_id] + tokens  # chunk k: inputs seq[16k : 16k+16], targets seq[16k+1 : 16k+17]
    full, rest = divmod(len(tokens), 16)
    assert full >= 3 and rest > 0
    expected = sum(direct_sum(model, seq[k:k + 17], 1, 17) for k in range(0, 16 * full, 16))
    # the last, partial chunk gets a full window of context (as in lm-eval): score its `rest` tokens
    expected += direct_sum(model, seq[-17:], 17 - rest, 17)
    report = perplexity(Evaluator(model, tok, progress=False), TEXT * 3, context=16)
    assert report["loglikelihood"] == pytest.approx(expected, abs=1e-4)


def test_strided_windows_condition_on_more_context(setup, tmp_path):
    model, tok = setup
    tokens = tok.encode(TEXT * 2, bos=False)
    seq = [tok.bos_id] + tokens
    # context 32, stride 8: after the first window, each token t at seq index i sees seq[i-32 .. i-1]
    # (the window ending at its group of 8), so compute each group directly
    expected = direct_sum(model, seq, 1, 33)
    for end in range(33, len(seq), 8):
        stop = min(end + 8, len(seq))
        window = seq[stop - 33:stop]
        expected += direct_sum(model, window, 33 - (stop - end), 33)
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 2, encoding="utf-8")
    report = perplexity_file(Evaluator(model, tok, progress=False), path, context=32, stride=8)
    assert report["tokens"] == len(tokens) and report["file"] == str(path)
    assert report["loglikelihood"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="longer than the model"):
        perplexity(Evaluator(model, tok, progress=False), TEXT, context=65)
