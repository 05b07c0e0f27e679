"""Task loaders: every shared eval file with the official record counts, and clear errors on bad records."""

from __future__ import annotations

import gzip
import json

import pytest

from llamalab.eval.tasks import TASKS, BadTaskRecord, load_task, local_file, parse_tasks

COUNTS = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
          "arc_challenge": 1172, "openbookqa": 500}


@pytest.mark.parametrize("task", list(COUNTS))
def test_shared_files_load_with_official_counts(shared, task):
    items = load_task(task, shared("eval"))
    assert len(items) == COUNTS[task] == TASKS[task].expected_records
    n_choices = {"boolq": {2}, "piqa": {2}, "siqa": {3}, "hellaswag": {4}, "winogrande": {2},
                 "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "openbookqa": {4}}[task]
    for it in items:
        assert len(it.choices) in n_choices and 0 <= it.gold < len(it.choices)
        assert all(c.startswith(" ") for c in it.continuations)


def test_known_prompts(shared):
    boolq = load_task("boolq", shared("eval"), limit=1)[0]
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq.continuations == [" no", " yes"] and boolq.gold == 0
    hella = load_task("hellaswag", shared("eval"), limit=1)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. he"
    assert hella.gold == 3 and hella.continuations[3] == " starts pulling up roofing on a roof."
    wino = load_task("winogrande", shared("eval"), limit=1)[0]
    assert wino.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.continuations == [" always got the easier cases."] * 2 and wino.gold == 1
    siqa = load_task("siqa", shared("eval"))
    assert siqa[102].choices[0] in siqa[102].choices[1:]  # duplicate options are kept


def test_gzip_and_limit(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    rec = {"ind": 0, "activity_label": "A", "ctx_a": "x [title] y", "ctx_b": "z", "ctx": "", "endings": ["e"] * 4,
           "label": "2"}
    with gzip.open(tmp_path / "hellaswag" / "validation.jsonl.gz", "wt") as fh:
        fh.write((json.dumps(rec) + "\n") * 3)
    items = load_task("hellaswag", tmp_path, limit=2)
    assert len(items) == 2 and items[0].contexts[0] == "A: x. y Z" and items[0].gold == 2


def test_bad_records_name_file_line_and_field(tmp_path):
    (tmp_path / "piqa").mkdir()
    path = tmp_path / "piqa" / "validation.jsonl"
    path.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a", "label": 0}\n')
    with pytest.raises(BadTaskRecord, match=r"validation\.jsonl:2: .*'sol2'"):
        load_task("piqa", tmp_path)
    path.write_text('{"goal": "g", \n')
    with pytest.raises(BadTaskRecord, match=r"validation\.jsonl:1: invalid JSON"):
        load_task("piqa", tmp_path)
    with pytest.raises(FileNotFoundError, match="boolq"):
        local_file(tmp_path, "boolq")


def test_parse_tasks():
    assert parse_tasks("all") == list(TASKS)
    assert parse_tasks("social_iqa, arc_easy") == ["siqa", "arc_easy"]
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        parse_tasks("mmlu")

