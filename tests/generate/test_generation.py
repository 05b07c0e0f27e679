"""Generation: cached decoding equals a full forward, batching is exact, sampling is seeded and restricted."""

from __future__ import annotations

import pytest
import torch

from llamalab.checkpoint import save_pretrained
from llamalab.generate import (
    ContextLengthError,
    Decoder,
    TextTracker,
    generate,
    generate_tokens,
    sample_next,
)

PROMPTS = [[1, 17, 40, 3], [1, 200, 201, 202, 203, 204, 205, 206, 207], [1]]


def test_cached_decoding_matches_full_forward_at_every_position(model):
    """Prefill a few tokens, then feed one token per step: logits equal a cache-free forward at every position.

    Each step attends over the decoder's window (the filled prefix rounded up to 64 slots), which grows from
    64 to 128 slots on the way."""
    torch.manual_seed(0)
    tokens = torch.randint(0, model.args.vocab_size, (3, 80))
    lengths = [5, 12, 1]  # rows prefilled to different lengths (right-padded), then decoded at their own positions
    with torch.no_grad():
        reference = model(tokens)
        decoder = Decoder(model, batch_size=3, cache_len=128)
        logits = decoder.prefill([tokens[i, :n].tolist() for i, n in enumerate(lengths)])
        for i, n in enumerate(lengths):
            torch.testing.assert_close(logits[i], reference[i, n - 1], rtol=0, atol=1e-5)
        pos = torch.tensor(lengths)[:, None]
        for _ in range(65):
            step = decoder.step_logits(tokens.gather(1, pos), pos, decoder.window(int(pos.max())))
            for i in range(3):
                torch.testing.assert_close(step[i], reference[i, pos[i, 0]], rtol=0, atol=1e-5)
            pos = pos + 1


def test_batched_greedy_equals_per_prompt(model):
    batched = generate_tokens(model, PROMPTS, max_new_tokens=24)
    alone = [generate_tokens(model, [p], max_new_tokens=24)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 24 for t in batched)


def test_batched_sampling_equals_per_prompt(model):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50, seed=7)
    batched = generate_tokens(model, PROMPTS, **kw)
    alone = [generate_tokens(model, [p], **kw)[0] for p in PROMPTS]
    assert batched == alone


def test_seed_reproducible_and_seed_matters(model):
    kw = dict(max_new_tokens=32, temperature=1.0)
    first = generate_tokens(model, PROMPTS[:1], seed=123, **kw)
    assert generate_tokens(model, PROMPTS[:1], seed=123, **kw) == first
    assert generate_tokens(model, PROMPTS[:1], seed=124, **kw) != first


def test_top_k_one_is_greedy(model):
    greedy = generate_tokens(model, PROMPTS, max_new_tokens=16)
    assert generate_tokens(model, PROMPTS, max_new_tokens=16, temperature=0.8, top_k=1, seed=1) == greedy


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])  # sorted: 1 (0.5), 2 (0.3), 3 (0.15), 0 (0.05)
    logits = probs.log().expand(4000, -1)
    uniform = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def support(**kw):
        return set(sample_next(logits, 1.0, uniform=uniform, **kw).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {1, 2}
    assert support(top_k=3) == {1, 2, 3}
    assert support(top_p=0.8) == {1, 2}  # 0.5 + 0.3 reaches 0.8: token 3 is not needed
    assert support(top_p=0.81) == {1, 2, 3}
    assert support(top_p=0.4) == {1}
    assert support(top_k=3, top_p=0.99) == {1, 2, 3}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    uniform = torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = sample_next(probs.log().expand(20000, -1), 1.0, uniform=uniform)
    freq = torch.bincount(draws, minlength=3).double() / 20000
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=0.015)


def test_over_long_prompt_raises_naming_the_lengths(model):
    prompt = list(range(1, 101))
    with pytest.raises(ContextLengthError, match=r"100 tokens.*max_new_tokens is 40.*max_seq_len=128"):
        generate_tokens(model, [prompt], max_new_tokens=40)
    with pytest.raises(ValueError, match="empty"):
        generate_tokens(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_tokens(model, [[1, 999]], max_new_tokens=4)


def test_eos_ends_a_row_and_is_kept(model):
    full = generate_tokens(model, PROMPTS, max_new_tokens=20)
    eos = full[0][5]
    first = full[0].index(eos)
    got = generate_tokens(model, PROMPTS, max_new_tokens=20, eos_id=eos)
    assert got[0] == full[0][: first + 1]
    for g, f in zip(got[1:], full[1:]):
        assert g == (f[: f.index(eos) + 1] if eos in f else f)


def test_stop_string_cuts_the_text(model, tokenizer):
    text = generate(model, tokenizer, "Once upon a time", max_new_tokens=40)
    assert len(text) > 12
    stop = text[8:11]
    expected = text[: text.find(stop)]
    assert generate(model, tokenizer, "Once upon a time", max_new_tokens=40, stop=stop) == expected
    assert generate(model, tokenizer, ["Once upon a time", "The cat"], max_new_tokens=40, stop=[stop, "zzz"])[0] \
        == expected


def test_text_is_the_continuation_of_the_prompt(model, tokenizer):
    """The returned text is exactly what decoding prompt + new tokens adds to the prompt (leading spaces kept)."""
    prompt = "The cat"
    ids = tokenizer.encode(prompt)
    new = generate_tokens(model, [ids], max_new_tokens=30)[0]
    text = generate(model, tokenizer, prompt, max_new_tokens=30)
    assert prompt + text == tokenizer.decode(ids + new)


@pytest.mark.parametrize("stop", [None, ["ll", "the"]])
def test_streaming_pieces_join_to_the_text(model, tokenizer, stop):
    for prompt in ["Once upon a time", "你好", "Café"]:
        kw = dict(max_new_tokens=60, temperature=1.0, seed=5, stop=stop)
        pieces = list(generate(model, tokenizer, prompt, stream=True, **kw))
        assert "".join(pieces) == generate(model, tokenizer, prompt, **kw)


def test_streaming_never_splits_a_multibyte_character(tokenizer):
    """Byte-fallback pieces of one character are held back until the character is complete."""
    text = " naïve ☃ 𝔘 世界 ok"
    ids = tokenizer.encode(text, bos=False)
    assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in ids)  # the test exercises byte pieces
    tracker = TextTracker(tokenizer, [tokenizer.bos_id], [])
    pieces = []
    for i in ids:
        tracker.add(i)
        pieces.append(tracker.ready())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode([tokenizer.bos_id] + ids)


def test_cli_generate(model, tokenizer, tmp_path, capsys, monkeypatch):
    import io

    from llamalab.commands.generate import main

    folder = save_pretrained(tmp_path / "ckpt", model, tokenizer_path=tokenizer.path)
    expected = generate(model, tokenizer, "The cat", max_new_tokens=12)
    assert main([str(folder), "--prompt", "The cat", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == "The cat" + expected + "\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("The cat\n" + "x" * 400 + "\nThe cat\n"))
    assert main([str(folder), "--interactive", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ("The cat" + expected + "\n") * 2
    assert "max_seq_len=128" in captured.err  # the over-long line is reported, the session goes on
