"""acc, acc_norm and the paper's scoring on hand-built items where they choose differently, end to end through
``evaluate_tasks`` with a fake model whose log-likelihoods we control; standard errors; the Markdown table."""

from __future__ import annotations

import json
import math

import pytest

from llamalab.eval.harness import evaluate_tasks
from llamalab.eval.scoring import argmax, choose, markdown_table, mean_stderr
from llamalab.eval.tasks import Item


class FakeEvaluator:
    """Answers ``loglikelihood`` from a table {(context, continuation): log-likelihood}."""

    def __init__(self, table: dict[tuple[str, str], float]):
        self.table = table
        self.seen: list[tuple[str, str]] = []

    def loglikelihood(self, pairs, groups=None, desc=""):
        self.seen += list(pairs)
        return [(self.table[p], False) for p in pairs]


def write(tmp_path, task: str, split: str, records: list[dict]) -> None:
    folder = tmp_path / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_piqa_acc_and_acc_norm_disagree(tmp_path):
    # sol1 is short and likelier in total; sol2 is long and likelier per character
    write(tmp_path, "piqa", "validation", [{"goal": "Open a jar", "sol1": "Twist", "sol2": "Twist the lid to the left",
                                            "label": 1}])
    ctx = "Question: Open a jar\nAnswer:"
    fake = FakeEvaluator({(ctx, " Twist"): -6.0, (ctx, " Twist the lid to the left"): -10.0})
    out = evaluate_tasks(fake, ["piqa"], tmp_path)
    ex = out["examples"]["piqa"][0]
    assert ex["pred"] == {"acc": 0, "acc_norm": 1, "paper": 1}  # -6/5 = -1.2 < -10/25 = -0.4
    assert out["results"]["piqa"]["acc"] == 0.0 and out["results"]["piqa"]["acc_norm"] == 1.0


def test_openbookqa_paper_calibration_disagrees_with_both(tmp_path):
    write(tmp_path, "openbookqa", "test", [{"id": "1", "question_stem": "The sun is a",
                                            "choices": {"text": ["star", "planet", "moon", "comet"],
                                                        "label": ["A", "B", "C", "D"]}, "answerKey": "C"}])
    ctx = "The sun is a"
    cond = {" star": -3.0, " planet": -5.0, " moon": -4.5, " comet": -20.0}
    # P(completion | "Answer:"): "moon" is rare a priori, so it gains the most from the question
    uncond = {" star": -1.0, " planet": -4.0, " moon": -8.0, " comet": -12.0}
    table = {(ctx, c): v for c, v in cond.items()} | {("Answer:", c): v for c, v in uncond.items()}
    fake = FakeEvaluator(table)
    ex = evaluate_tasks(fake, ["openbookqa"], tmp_path)["examples"]["openbookqa"][0]
    # acc: star (-3); acc_norm: star too (-3/4 = -0.75 beats -5/6, -4.5/4, -20/5)
    assert ex["pred"]["acc"] == 0 and ex["pred"]["acc_norm"] == 0
    assert ex["pred"]["paper"] == 2  # differences: -2, -1, +3.5, -8
    assert ex["gold"] == 2 and ex["correct"] == {"acc": 0, "acc_norm": 0, "paper": 1}
    assert ex["unconditional_loglikelihoods"] == [-1.0, -4.0, -8.0, -12.0]
    assert ("Answer:", " moon") in fake.seen


def test_boolq_calibration_decides_the_paper_pick():
    item = Item("boolq", 0, ["p\nQuestion: q?\nAnswer:"] * 2, [" no", " yes"], ["no", "yes"], gold=1)
    # no: -2 (per char -1.0), yes: -2.5 (per char -0.83); unconditional favours "no" strongly
    picks = choose(item, [-2.0, -2.5], unconditional=[-0.5, -3.0])
    assert picks == {"acc": 0, "acc_norm": 1, "paper": 1}
    picks = choose(item, [-2.0, -2.5], unconditional=[-3.0, -0.5])
    assert picks == {"acc": 0, "acc_norm": 1, "paper": 0}
    with pytest.raises(ValueError, match="Answer:"):
        choose(item, [-2.0, -2.5])


def test_winogrande_partial_scoring_norm_and_paper(tmp_path):
    write(tmp_path, "winogrande", "validation", [{"sentence": "Sarah was better than Maria so _ won.",
                                                  "option1": "Sarah", "option2": "Maria", "answer": "1"}])
    c1, c2 = "Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"
    fake = FakeEvaluator({(c1, " won."): -7.0, (c2, " won."): -6.9})
    ex = evaluate_tasks(fake, ["winogrande"], tmp_path)["examples"]["winogrande"][0]
    # the continuation is shared, so the paper's per-character normalisation cannot change the pick
    assert ex["pred"]["acc"] == 1 and ex["pred"]["paper"] == 1 and ex["gold"] == 0
    # lm-eval's acc_norm divides by the *contexts'* lengths (doc_to_choice): equal here, so it agrees
    assert ex["pred"]["acc_norm"] == 1


def test_siqa_duplicate_options_kept_and_ties_go_first(tmp_path):
    write(tmp_path, "siqa", "validation", [{"context": "C.", "question": "Q?", "answerA": "same",
                                            "answerB": "same", "answerC": "other", "label": "2"}])
    ctx = "Q: C. Q?\nA:"
    fake = FakeEvaluator({(ctx, " same"): -1.0, (ctx, " other"): -2.0})
    ex = evaluate_tasks(fake, ["siqa"], tmp_path)["examples"]["siqa"][0]
    assert ex["loglikelihoods"] == [-1.0, -1.0, -2.0]
    assert ex["pred"] == {"acc": 0, "acc_norm": 0, "paper": 0}  # a tie picks the first, like numpy.argmax
    assert argmax([1.0, 3.0, 3.0]) == 1


def test_mean_stderr_is_lm_eval_formula():
    mean, err = mean_stderr([1, 0, 1, 1])
    assert mean == 0.75
    assert err == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25, over n
    metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1, 0, 0, 1, 1, 1, 0, 1]
    assert mean_stderr(values)[1] == pytest.approx(metrics.mean_stderr(values))


def test_markdown_table_shows_paper_numbers_for_the_preset():
    results = {"boolq": {"n": 4, "acc": 0.75, "acc_stderr": 0.25, "acc_norm": 0.5, "acc_norm_stderr": 0.29,
                         "paper": 1.0, "paper_stderr": 0.0}}
    table = markdown_table(results, "paper", "llama-13b")
    assert "paper llama-13b" in table and "| boolq | 4 | 100.0 ± 0.0 (calibrated) | 78.1 |" in table
    table = markdown_table(results, "lm-eval", None)
    assert "| boolq | 4 | 75.0 ± 25.0 | 50.0 ± 29.0 * | 76.5 |" in table and "reference" in table
