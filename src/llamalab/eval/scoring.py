"""Choosing an answer from choice log-likelihoods, three ways, and aggregating accuracies with standard errors.

- ``acc``: the choice with the largest sum of continuation log-probabilities (lm-eval's ``acc``).
- ``acc_norm``: the largest log-likelihood divided by the choice's length in characters (lm-eval's ``acc_norm``,
  which divides by the length of the ``doc_to_choice`` string; for WinoGrande those are the two contexts).
- ``paper``: the LLaMA paper's protocol (section 3): likelihood normalised by the number of characters of the
  completion, except for OpenBookQA and BoolQ, where the choice maximises
  P(completion | context) / P(completion | "Answer:") (Brown et al., 2020). For WinoGrande the completion is the
  part after the blank, the same for both options, so ``paper`` equals ``acc`` there.

Ties go to the first choice, as ``numpy.argmax`` does in lm-eval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .tasks import TASKS, Item

METRICS = ("acc", "acc_norm", "paper")

# The LLaMA paper, Table 3 (zero-shot common-sense reasoning), accuracy in %.
PAPER_TABLE3 = {
    "llama-7b": {"boolq": 76.5, "piqa": 79.8, "siqa": 48.9, "hellaswag": 76.1, "winogrande": 70.1,
                 "arc_easy": 72.8, "arc_challenge": 47.6, "openbookqa": 57.2},
    "llama-13b": {"boolq": 78.1, "piqa": 80.1, "siqa": 50.4, "hellaswag": 79.2, "winogrande": 73.0,
                  "arc_easy": 74.8, "arc_challenge": 52.7, "openbookqa": 56.4},
    "llama-33b": {"boolq": 83.1, "piqa": 82.3, "siqa": 50.4, "hellaswag": 82.8, "winogrande": 76.0,
                  "arc_easy": 80.0, "arc_challenge": 57.8, "openbookqa": 58.6},
    "llama-65b": {"boolq": 85.3, "piqa": 82.8, "siqa": 52.3, "hellaswag": 84.2, "winogrande": 77.0,
                  "arc_easy": 78.9, "arc_challenge": 56.0, "openbookqa": 60.2},
}

# The metrics lm-eval 0.4.13's task yamls report (the others are computed the same way but not shown by lm-eval).
LM_EVAL_REPORTED = {
    "boolq": ("acc",), "piqa": ("acc", "acc_norm"), "siqa": ("acc",), "hellaswag": ("acc", "acc_norm"),
    "winogrande": ("acc",), "arc_easy": ("acc", "acc_norm"), "arc_challenge": ("acc", "acc_norm"),
    "openbookqa": ("acc", "acc_norm"),
}


def argmax(scores: Sequence[float]) -> int:
    """Index of the largest score, the first one on ties (``numpy.argmax``)."""
    best = 0
    for i, s in enumerate(scores):
        if s > scores[best]:
            best = i
    return best


def choose(item: Item, lls: Sequence[float], unconditional: Sequence[float] | None = None) -> dict[str, int]:
    """The choice each metric picks. ``unconditional`` (log P(completion | "Answer:")) is needed for the paper's
    scoring of the calibrated tasks (BoolQ, OpenBookQA)."""
    if len(lls) != len(item.choices):
        raise ValueError(f"{item.task}#{item.index}: {len(lls)} log-likelihoods for {len(item.choices)} choices")
    picks = {"acc": argmax(lls), "acc_norm": argmax([ll / len(c) for ll, c in zip(lls, item.choices)])}
    if TASKS[item.task].calibrated:
        if unconditional is None:
            raise ValueError(f"{item.task}: the paper's scoring needs log P(completion | 'Answer:')")
        picks["paper"] = argmax([ll - u for ll, u in zip(lls, unconditional)])
    else:  # characters of the completion, without the delimiter space in front
        picks["paper"] = argmax([ll / max(1, len(c) - 1) for ll, c in zip(lls, item.continuations)])
    return picks


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample standard deviation (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mu = sum(values) / n
    if n == 1:
        return mu, math.nan
    var = sum((x - mu) ** 2 for x in values) / (n - 1)
    return mu, math.sqrt(var) / math.sqrt(n)


def aggregate(examples: Sequence[dict]) -> dict[str, float]:
    """{metric: accuracy, metric_stderr: its standard error, n} over per-example records with ``correct``."""
    out: dict[str, float] = {"n": len(examples)}
    for metric in METRICS:
        mean, err = mean_stderr([float(e["correct"][metric]) for e in examples])
        out[metric], out[f"{metric}_stderr"] = mean, err
    return out


def matching_preset(args) -> str | None:
    """The paper preset whose shape ``args`` has (dim, layers, heads, vocabulary), if any."""
    from ..model.args import PRESETS

    for name in PAPER_TABLE3:
        p = PRESETS[name].args
        if (p.dim, p.n_layers, p.n_heads, p.vocab_size) == (args.dim, args.n_layers, args.n_heads, args.vocab_size):
            return name
    return None


def _pct(value: float, err: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{100 * value:.1f}" + ("" if math.isnan(err) else f" ± {100 * err:.1f}")


def markdown_table(results: dict, scoring: str, preset: str | None) -> str:
    """Accuracies in %, with the paper's Table 3 number for ``preset`` (or LLaMA-7B for reference)."""
    ref = preset or "llama-7b"
    ref_label = f"paper {ref}" if preset else "paper llama-7b (reference)"
    if scoring == "paper":
        header = ["task", "n", "paper protocol", ref_label]
    else:
        header = ["task", "n", "acc", "acc_norm", ref_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for task, r in results.items():
        paper_value = PAPER_TABLE3[ref].get(task)
        paper_cell = "—" if paper_value is None else f"{paper_value:.1f}"
        if scoring == "paper":
            protocol = "calibrated" if TASKS[task].calibrated else "char-norm"
            cells = [task, str(r["n"]), f"{_pct(r['paper'], r['paper_stderr'])} ({protocol})", paper_cell]
        else:
            norm = _pct(r["acc_norm"], r["acc_norm_stderr"])
            if "acc_norm" not in LM_EVAL_REPORTED[task]:
                norm += " *"
            cells = [task, str(r["n"]), _pct(r["acc"], r["acc_stderr"]), norm, paper_cell]
        lines.append("| " + " | ".join(cells) + " |")
    if scoring != "paper":
        lines.append("")
        lines.append("\\* not reported by lm-evaluation-harness for this task (computed the same way).")
    return "\n".join(lines)
