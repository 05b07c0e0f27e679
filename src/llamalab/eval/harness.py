"""Log-likelihoods of continuations, fast and exactly as lm-evaluation-harness computes them.

Tokenization follows lm-eval 0.4.13's causal models (``TemplateLM._encode_pair``): trailing spaces of the context
move to the continuation, the pair is encoded whole (with BOS) and split after the context's own encoding, so
merges across the boundary are kept; an empty context becomes the BOS token. An input longer than the model's
context is cut on the left to ``max_length + 1`` tokens, as lm-eval does.

Speed comes from three things lm-eval's ``hf`` backend does not do:
- requests that share a token prefix (the choices of one question) run that prefix once; the key/value tensors
  it leaves are reused by every choice, whose remaining tokens run as one batch;
- the output layer and log-softmax run only where a continuation token is scored, not at every position;
- identical requests (the same unconditional "Answer:" query for every BoolQ item) are computed once.
Requests are sorted by length and batched, so padding is small; ``dtype=torch.bfloat16`` runs the model in bf16
(log-softmax stays fp32).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class TokenRequest:
    """One continuation to score: ``context`` and ``continuation`` token ids (context non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's pair encoding for causal models (``TemplateLM.loglikelihood`` and ``_encode_pair``)."""
    if context == "":
        cont = tokenizer.encode(continuation, bos=False)
        bos = tokenizer.bos_id
        return ([bos], cont) if cont[:1] != [bos] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_seq_len: int, stride: int | None = None
                    ) -> list[TokenRequest]:
    """Windows that score every token exactly once (lm-eval's ``get_rolling_token_windows`` + disjoint).

    The first window sees ``prefix_token`` (BOS) and the first ``max_seq_len - 1`` tokens; each later window
    scores the next ``stride`` tokens (default ``max_seq_len``: disjoint windows, lm-eval's choice) with at least
    ``max_seq_len - stride`` tokens of context before them.
    """
    stride = max_seq_len if stride is None else stride
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be between 1 and the context length {max_seq_len}, got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_seq_len, len(tokens))
    windows = [TokenRequest((prefix_token,), tuple(tokens[:first]))]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        # max_seq_len + 1 tokens in all: the model's input is the first max_seq_len of them
        windows.append(TokenRequest(tuple(tokens[end - max_seq_len - 1:end - n]), tuple(tokens[end - n:end])))
        done = end
    return windows


class _RecordKV:
    """A cache (``Transformer``'s protocol) for the mask-free prefix pass: keeps the new keys and values and
    returns just them, so that pass's attention is the plain causal one."""

    def update(self, input_pos, k, v):
        self.k, self.v = k, v
        return k, v


class _PrefixKV:
    """A cache for the masked pass over the rest: prepends each row's padded prefix keys/values (gathered from
    a ``_RecordKV``) to the new tokens' ones; the mask hides the padding.

    The gather happens inside ``update``, so only one layer's per-row copies exist at a time."""

    def __init__(self, record: _RecordKV, rows: torch.Tensor):
        self.record, self.rows = record, rows

    def update(self, input_pos, k, v):
        return (torch.cat([self.record.k[self.rows], k], dim=2),
                torch.cat([self.record.v[self.rows], v], dim=2))


def _common_prefix(seqs: list[tuple[int, ...]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class Scorer:
    """Scores ``TokenRequest``s with a llamalab ``Transformer``: (sum of log-probabilities, is greedy) each.

    ``batch_size`` is the number of continuations per forward batch. ``max_length`` defaults to the model's
    ``max_seq_len``; longer inputs lose tokens on the left like in lm-eval.
    """

    def __init__(self, model, *, batch_size: int = 32, max_length: int | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True):
        self.model = model.eval()
        if dtype is not None and next(model.parameters()).dtype != dtype:
            self.model = model.to(dtype)
        self.device = next(model.parameters()).device
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or model.args.max_seq_len
        self.progress = progress

    @torch.inference_mode()
    def score(self, requests: Sequence[TokenRequest], groups: Sequence[Hashable] | None = None,
              desc: str = "scoring") -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) for each request. Requests with the same ``groups`` key (default: the same
        context) share their common token prefix; identical requests are computed once."""
        unique: dict[tuple, int] = {}
        order = []
        for r in requests:
            if not r.context:
                raise ValueError("a request needs at least one context token (BOS for an empty context)")
            if not r.continuation:
                raise ValueError("a request needs at least one continuation token")
            order.append(unique.setdefault((r.context, r.continuation), len(unique)))
        keys = list(unique)
        group_of: dict[int, Hashable] = {}
        for r, u, g in zip(requests, order, groups if groups is not None else [None] * len(requests)):
            group_of.setdefault(u, r.context if g is None else g)
        by_group: dict[Hashable, list[int]] = {}
        for u in range(len(keys)):
            by_group.setdefault(group_of[u], []).append(u)

        # inputs as lm-eval builds them: (context + continuation)[-(max_length + 1):][:-1]
        prepared = []  # per group: (prefix length, [(unique id, input ids, number of scored tokens)])
        for members in by_group.values():
            rows = []
            for u in members:
                ctx, cont = keys[u]
                n = len(cont)
                if n > self.max_length:  # lm-eval cannot score this either: score the last max_length tokens
                    warnings.warn(f"a continuation of {n} tokens is longer than the model's context "
                                  f"({self.max_length}); only its last {self.max_length} tokens are scored",
                                  stacklevel=2)
                    n = self.max_length
                full = (ctx + cont)[-(self.max_length + 1):]
                rows.append((u, full[:-1], n))
            inputs = [r[1] for r in rows]
            # the shared prefix must end before the first scored position of every row
            prefix = min(_common_prefix(inputs), min(len(i) - n + 1 for _, i, n in rows))
            if prefix >= 1:
                prepared.append((prefix, rows))
            else:  # nothing shared (inputs cut differently on the left): each row alone
                prepared.extend((len(i) - n + 1, [(u, i, n)]) for u, i, n in rows)
        prepared.sort(key=lambda g: -max(len(i) for _, i, _ in g[1]))

        results: list[tuple[float, bool] | None] = [None] * len(keys)
        bar = tqdm(total=len(keys), desc=desc, disable=not self.progress, unit="req")
        batch: list = []
        n_rows = 0
        for group in prepared:  # the product mode (fp32 where bf16 is slow) is the caller's: the eval command's
            batch.append(group)
            n_rows += len(group[1])
            if n_rows >= self.batch_size:
                self._run(batch, keys, results)
                bar.update(n_rows)
                batch, n_rows = [], 0
        if batch:
            self._run(batch, keys, results)
            bar.update(n_rows)
        bar.close()
        return [results[u] for u in order]

    def _run(self, batch, keys, results) -> None:
        """One prefix pass over the batch's groups, then one pass over all their rows' remaining tokens."""
        model, dev = self.model, self.device
        n_layers = len(model.layers)
        prefix_lens = torch.tensor([p for p, _ in batch], device=dev)
        lp = int(prefix_lens.max())
        prefix_tokens = torch.zeros(len(batch), lp, dtype=torch.long, device=dev)
        for g, (p, rows) in enumerate(batch):
            prefix_tokens[g, :p] = torch.tensor(rows[0][1][:p], device=dev)
        records = [_RecordKV() for _ in range(n_layers)]
        # (G, dim) at each prefix's last token; the right padding after it is never seen
        h_last = model.hidden_states(prefix_tokens, caches=records, at=prefix_lens - 1)[:, 0]

        flat = [(g, u, inp, n) for g, (_, rows) in enumerate(batch) for u, inp, n in rows]
        lc = max(1, max(len(inp) - batch[g][0] for g, _, inp, _ in flat))
        tokens = torch.zeros(len(flat), lc, dtype=torch.long, device=dev)
        row_group = torch.tensor([g for g, *_ in flat], device=dev)
        for j, (g, _, inp, _) in enumerate(flat):
            rest = inp[batch[g][0]:]
            if rest:
                tokens[j, :len(rest)] = torch.tensor(rest, device=dev)
        row_prefix = prefix_lens[row_group]
        # padding after a row's last token may run past the rotary table: clamp it (its output is never read)
        input_pos = (row_prefix[:, None] + torch.arange(lc, device=dev)[None, :]).clamp_(max=len(model.rope_cos) - 1)
        key_pos = torch.arange(lp + lc, device=dev)
        # a row sees its own prefix (not the padding after it) and its own earlier tokens
        mask = torch.cat([
            (key_pos[None, :lp] < row_prefix[:, None])[:, None, :].expand(-1, lc, -1),
            torch.ones(lc, lc, dtype=torch.bool, device=dev).tril()[None].expand(len(flat), -1, -1),
        ], dim=2)[:, None]
        caches = [_PrefixKV(rec, row_group) for rec in records]
        h_rest = model.hidden_states(tokens, input_pos=input_pos, caches=caches, mask=mask)  # (R, lc, dim)

        # hidden state predicting each scored token: position prefix-1 is the prefix pass's last one
        hidden = torch.cat([h_last, h_rest.reshape(-1, h_rest.shape[-1])])
        index, targets, owners = [], [], []
        for j, (g, u, inp, n) in enumerate(flat):
            p = batch[g][0]
            cont = keys[u][1]
            for t, pos in enumerate(range(len(inp) - n, len(inp))):
                index.append(g if pos == p - 1 else len(batch) + j * lc + (pos - p))
                targets.append(cont[len(cont) - n + t])
                owners.append(j)
        index_t = torch.tensor(index, device=dev)
        logprobs = model.output(hidden[index_t]).float().log_softmax(-1)
        targets_t = torch.tensor(targets, device=dev)
        token_ll = logprobs.gather(1, targets_t[:, None]).squeeze(1)
        greedy = logprobs.argmax(-1) == targets_t
        owners_t = torch.tensor(owners, device=dev)
        ll = torch.zeros(len(flat), dtype=torch.float64, device=dev).index_add_(0, owners_t, token_ll.double())
        misses = torch.zeros(len(flat), dtype=torch.long, device=dev).index_add_(0, owners_t, (~greedy).long())
        for j, (_, u, _, _) in enumerate(flat):
            results[u] = (float(ll[j]), bool(misses[j] == 0))


class Evaluator:
    """A model and its tokenizer, scoring text pairs the way lm-evaluation-harness does."""

    def __init__(self, model, tokenizer, **scorer_kwargs):
        self.tokenizer = tokenizer
        self.scorer = Scorer(model, **scorer_kwargs)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], groups: Sequence[Hashable] | None = None,
                      desc: str = "scoring") -> list[tuple[float, bool]]:
        requests = [TokenRequest(*map(tuple, encode_pair(self.tokenizer, c, x))) for c, x in pairs]
        return self.scorer.score(requests, groups, desc=desc)

    def loglikelihood_rolling(self, texts: Sequence[str], max_length: int | None = None,
                              stride: int | None = None, desc: str = "rolling",
                              score_bos: bool = False) -> list[tuple[float, int]]:
        """(total log-likelihood, number of tokens) of each text on its own, after BOS, in sliding windows.

        ``score_bos=True`` also scores the BOS token itself after a BOS prefix, which is what lm-eval's ``hf``
        backend does with a tokenizer that adds BOS (its ``tok_encode`` keeps it in the scored tokens).
        """
        max_length = max_length or self.scorer.max_length
        windows, owner, counts = [], [], []
        for i, text in enumerate(texts):
            tokens = self.tokenizer.encode(text, bos=score_bos)
            counts.append(len(tokens))
            for w in rolling_windows(tokens, self.tokenizer.bos_id, max_length, stride):
                windows.append(w)
                owner.append(i)
        scores = self.scorer.score(windows, groups=list(range(len(windows))), desc=desc)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        return list(zip(totals, counts))


def evaluate_tasks(evaluator: Evaluator, tasks: Sequence[str], data_dir=None, limit: int | None = None) -> dict:
    """Run the named tasks: {"results": {task: metrics}, "examples": {task: per-item records}, "timing": ...}.

    All three choices (acc, acc_norm, the paper's) are computed for every item; the calibrated tasks also score
    each choice after "Answer:" (identical requests are computed once, so BoolQ adds just two).
    """
    import time

    from .scoring import aggregate, choose
    from .tasks import TASKS, UNCONDITIONAL_CONTEXT, load_task

    results, examples, timing = {}, {}, {}
    for task in tasks:
        items = load_task(task, data_dir, limit)
        pairs, groups = [], []
        for it in items:
            pairs += list(zip(it.contexts, it.continuations))
            groups += [("c", it.index)] * len(it.contexts)
            if TASKS[task].calibrated:
                pairs += [(UNCONDITIONAL_CONTEXT, c) for c in it.continuations]
                groups += [("u", it.index)] * len(it.continuations)
        start = time.perf_counter()
        scores = evaluator.loglikelihood(pairs, groups, desc=task)
        seconds = time.perf_counter() - start
        records, k = [], 0
        for it in items:
            n = len(it.continuations)
            lls = [s[0] for s in scores[k:k + n]]
            k += n
            unconditional = None
            if TASKS[task].calibrated:
                unconditional = [s[0] for s in scores[k:k + n]]
                k += n
            picks = choose(it, lls, unconditional)
            records.append({"index": it.index, "gold": it.gold, "loglikelihoods": lls,
                            "unconditional_loglikelihoods": unconditional, "pred": picks,
                            "correct": {m: int(p == it.gold) for m, p in picks.items()}})
        results[task] = aggregate(records)
        examples[task] = records
        timing[task] = {"seconds": seconds, "examples_per_second": len(items) / seconds if seconds else None}
    return {"results": results, "examples": examples, "timing": timing}
