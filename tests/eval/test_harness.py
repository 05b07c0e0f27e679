"""The fast scorer equals a plain full forward pass, and pairs/windows are built as lm-evaluation-harness does."""

from __future__ import annotations

import random

import pytest
import torch

from llamalab.eval.harness import Scorer, TokenRequest, encode_pair, rolling_windows
from llamalab.model import ModelArgs, build_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=48)


def direct(model, req: TokenRequest, max_length: int) -> tuple[float, bool]:
    """Sum of log P(continuation) from one full forward of (context + continuation)[-(max_length+1):][:-1]."""
    full = list(req.context + req.continuation)[-(max_length + 1):]
    n = min(len(req.continuation), max_length)
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]])).float().log_softmax(-1)[0, -n:]
    target = torch.tensor(full[-n:])
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def random_requests(rng: random.Random, vocab: int) -> tuple[list[TokenRequest], list[int]]:
    """Questions with shared contexts (several choices), varying contexts with a shared continuation
    (WinoGrande-like), duplicates, and inputs longer than the context (cut on the left)."""
    reqs, groups = [], []
    for q in range(12):
        ctx = tuple(rng.randrange(vocab) for _ in range(rng.choice([1, 3, 10, 30, 60])))
        if q % 3 == 2:  # varying contexts, shared continuation
            cont = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 6)))
            for _ in range(2):
                reqs.append(TokenRequest(ctx + tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 4))), cont))
                groups.append(q)
        else:
            for _ in range(rng.randint(1, 4)):
                reqs.append(TokenRequest(ctx, tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 12)))))
                groups.append(q)
    reqs.append(reqs[0])  # an exact duplicate
    groups.append(groups[0])
    return reqs, groups


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_scorer_equals_full_forward(batch_size):
    model = build_model(ARGS, seed=0).eval()
    reqs, groups = random_requests(random.Random(batch_size), ARGS.vocab_size)
    got = Scorer(model, batch_size=batch_size, progress=False).score(reqs, groups)
    for req, (ll, greedy) in zip(reqs, got):
        ref_ll, ref_greedy = direct(model, req, ARGS.max_seq_len)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy
    # grouping by context (the default) gives the same numbers
    again = Scorer(model, batch_size=batch_size, progress=False).score(reqs)
    assert [a for a, _ in again] == pytest.approx([a for a, _ in got], abs=1e-5)


def test_greedy_flag_can_be_true():
    """A continuation made of the model's own argmax tokens is greedy (so the flag is not always False)."""
    model = build_model(ARGS, seed=0).eval()
    ctx = [5, 6, 7]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    (_, greedy), = Scorer(model, progress=False).score([TokenRequest(tuple(ctx), (nxt,))])
    (_, not_greedy), = Scorer(model, progress=False).score([TokenRequest(tuple(ctx), ((nxt + 1) % 97,))])
    assert greedy and not not_greedy


def test_bf16_close_to_fp32():
    model = build_model(ARGS, seed=0).eval()
    reqs, groups = random_requests(random.Random(7), ARGS.vocab_size)
    fp32 = Scorer(model, progress=False).score(reqs, groups)
    bf16 = Scorer(build_model(ARGS, seed=0), dtype=torch.bfloat16, progress=False).score(reqs, groups)
    for (a, _), (b, _), r in zip(fp32, bf16, reqs):
        assert b == pytest.approx(a, abs=0.05 * len(r.continuation) + 0.05)


class CharTokenizer:
    """A tokenizer that merges "ab" into one token, to show that pairs are encoded whole and then split."""

    bos_id = 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(2)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return [self.bos_id] + ids if bos else ids


def test_encode_pair_like_lm_eval():
    tok = CharTokenizer()
    # trailing spaces of the context move to the continuation
    assert encode_pair(tok, "Q: x\nA: ", "yes") == ([1] + [ord(c) for c in "Q: x\nA:"], [ord(" ")] + [ord(c) for c in "yes"])
    # the pair is encoded whole: the context's own encoding is kept, the continuation is what follows it
    assert encode_pair(tok, "xa", "b") == ([1, ord("x"), ord("a")], [])
    # empty context: the continuation after BOS
    assert encode_pair(tok, "", " no") == ([1], [ord(" "), ord("n"), ord("o")])


def test_encode_pair_matches_lm_eval_template_lm():
    lm_model = pytest.importorskip("lm_eval.api.model")

    class Stub(lm_model.TemplateLM):
        eot_token_id = 1
        tok = CharTokenizer()

        def tok_encode(self, string, add_special_tokens=None, **kw):
            return self.tok.encode(string, bos=add_special_tokens is not False)

        def _loglikelihood_tokens(self, requests, **kw):
            return [(r[1], r[2]) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    from lm_eval.api.instance import Instance

    pairs = [("Q: x\nA: ", "yes"), ("xa", "bc"), ("", " no"), ("ab  ", " ab"), ("a", "b")]
    theirs = Stub().loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], True)
    assert [tuple(t) for t in theirs] == [encode_pair(CharTokenizer(), *p) for p in pairs]


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (10, 4), (23, 5), (7, 16)])
def test_rolling_windows_match_lm_eval(n, max_len):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, 1, max_len)
    scored = [t for w in windows for t in w.continuation]
    assert scored == tokens  # every token exactly once
    for w in windows:
        assert len(w.context) + len(w.continuation) - 1 <= max_len
    utils = pytest.importorskip("lm_eval.utils")
    theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 1, max_len, 1)]
    assert [(tuple(a), tuple(b)) for a, b in theirs] == [(w.context, w.continuation) for w in windows]


def test_rolling_windows_with_stride_keep_context():
    tokens = list(range(50))
    windows = rolling_windows(tokens, 1, 16, stride=4)
    assert [t for w in windows for t in w.continuation] == tokens
    for w in windows[1:]:
        assert len(w.context) + len(w.continuation) == 17  # full windows: 16 inputs, the last 4 scored
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(tokens, 1, 16, stride=17)
