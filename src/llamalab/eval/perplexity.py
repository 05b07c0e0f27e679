"""Perplexity of a text file with a sliding window: nats per token and bits per byte.

Bits per byte divide the total log-likelihood by the text's UTF-8 bytes instead of its tokens, so models with
different tokenizers can be compared. Every token is scored exactly once: the first window starts from BOS,
each later one scores the next ``stride`` tokens with ``context - stride`` tokens of context before them
(``stride = context``, the default, gives lm-eval's disjoint ``loglikelihood_rolling`` windows).
"""

from __future__ import annotations

import math
from pathlib import Path

from .harness import Evaluator


def perplexity(evaluator: Evaluator, text: str, context: int | None = None, stride: int | None = None) -> dict:
    context = context or evaluator.scorer.max_length
    if context > evaluator.scorer.max_length:
        raise ValueError(f"--context {context} is longer than the model's context ({evaluator.scorer.max_length})")
    stride = stride or context
    (ll, n_tokens), = evaluator.loglikelihood_rolling([text], max_length=context, stride=stride, desc="perplexity")
    if n_tokens == 0:
        raise ValueError("the text is empty: nothing to score")
    n_bytes = len(text.encode("utf-8"))
    nats = -ll / n_tokens
    return {"tokens": n_tokens, "bytes": n_bytes, "loglikelihood": ll, "nats_per_token": nats,
            "perplexity": math.exp(nats), "bits_per_byte": -ll / math.log(2) / n_bytes,
            "context": context, "stride": stride}


def perplexity_file(evaluator: Evaluator, path: str | Path, **kwargs) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return {"file": str(path), **perplexity(evaluator, text, **kwargs)}
