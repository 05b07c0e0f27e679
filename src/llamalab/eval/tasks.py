"""The LLaMA paper's zero-shot common-sense tasks, with prompts and targets exactly as lm-evaluation-harness
0.4.13 builds them (``lm_eval/tasks/{super_glue/boolq,piqa,siqa,hellaswag,winogrande,arc,openbookqa}``).

Every task turns a record (Hugging Face schema) into an ``Item``: one context per choice (the same context
repeated, except WinoGrande's partial scoring where the context varies), one continuation per choice (the
target delimiter, a space, already prepended), the strings lm-eval's ``doc_to_choice`` returns (their lengths
in characters are ``acc_norm``'s divisor) and the gold index.

Records come from a local folder laid out like ``../shared/data/eval`` (``<task>/<split>.jsonl[.gz]``) or, when
the machine is online and ``datasets`` is installed, from the hub datasets lm-eval reads.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, describe

# The context the paper's calibrated scoring conditions on (Brown et al., 2020): P(completion | "Answer:").
UNCONDITIONAL_CONTEXT = "Answer:"


@dataclass
class Item:
    task: str
    index: int  # row in the split
    contexts: list[str]  # one per choice
    continuations: list[str]  # one per choice, with lm-eval's target delimiter in front
    choices: list[str]  # lm-eval's doc_to_choice strings; acc_norm divides by their length in characters
    gold: int

    def __post_init__(self) -> None:
        """An answer outside the choices would only ever score as wrong: refuse the record instead."""
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"the answer is choice {self.gold} (from 0) of only {len(self.choices)} choices")


class BadTaskRecord(UserError, ValueError):
    """A record lacks a field or has a value of the wrong kind; the message names file, line and field."""


def _field(doc: dict, name: str, kind: type | tuple[type, ...]):
    """``doc[name]`` if it is of ``kind`` (``load_task`` has checked that every field is there)."""
    value = doc[name]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"field {name!r} is {type(value).__name__}, expected {expected}")
    return value


def _missing_field(doc: dict, fields: tuple[str, ...]) -> str | None:
    """The first of ``fields`` (dotted for nested ones: ``choices.text``) that ``doc`` lacks."""
    for field in fields:
        node = doc
        for key in field.split("."):
            if not isinstance(node, dict) or key not in node:
                return field
            node = node[key]
    return None


def _same_context(task: str, index: int, context: str, choices: list[str], gold: int) -> Item:
    return Item(task, index, [context] * len(choices), [" " + c for c in choices], choices, gold)


def _boolq(doc: dict, index: int) -> Item:
    # doc_to_text "{{passage}}\nQuestion: {{question}}?\nAnswer:", doc_to_choice ["no", "yes"], target label
    context = f"{_field(doc, 'passage', str)}\nQuestion: {_field(doc, 'question', str)}?\nAnswer:"
    return _same_context("boolq", index, context, ["no", "yes"], int(_field(doc, "label", int)))


def _piqa(doc: dict, index: int) -> Item:
    context = f"Question: {_field(doc, 'goal', str)}\nAnswer:"
    choices = [_field(doc, "sol1", str), _field(doc, "sol2", str)]
    return _same_context("piqa", index, context, choices, int(_field(doc, "label", int)))


def _siqa(doc: dict, index: int) -> Item:
    # "Q: {{context}} {{question}}\nA:", target "{{ (label|int) - 1 }}"; options are kept even when two are equal
    context = f"Q: {_field(doc, 'context', str)} {_field(doc, 'question', str)}\nA:"
    choices = [_field(doc, k, str) for k in ("answerA", "answerB", "answerC")]
    return _same_context("siqa", index, context, choices, int(_field(doc, "label", (str, int))) - 1)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py:preprocess`` (removes WikiHow markup; a no-op on most cleaned text)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(doc: dict, index: int) -> Item:
    ctx = _field(doc, "ctx_a", str) + " " + _field(doc, "ctx_b", str).capitalize()
    context = hellaswag_preprocess(_field(doc, "activity_label", str) + ": " + ctx)
    endings = _field(doc, "endings", list)
    choices = [hellaswag_preprocess(e) for e in endings]
    return _same_context("hellaswag", index, context, choices, int(_field(doc, "label", (str, int))))


def _winogrande(doc: dict, index: int) -> Item:
    # Partial scoring: the context is the sentence up to the blank with each option filled in; the scored
    # continuation is the rest of the sentence, the same for both options.
    sentence = _field(doc, "sentence", str)
    if "_" not in sentence:
        raise ValueError("field 'sentence' has no '_' blank for the options")
    blank = sentence.index("_")
    choices = [sentence[:blank] + _field(doc, "option1", str), sentence[:blank] + _field(doc, "option2", str)]
    target = " " + sentence[blank + 1:].strip()
    answer = str(_field(doc, "answer", (str, int)))
    if answer not in ("1", "2"):
        raise ValueError(f"field 'answer' is {answer!r}, expected '1' or '2'")
    return Item("winogrande", index, choices, [target, target], choices, int(answer) - 1)


def _labelled_choices(doc: dict, answer_key: str) -> tuple[list[str], int]:
    """ARC's and OpenBookQA's choice texts, and the index of ``answer_key`` among their labels."""
    choices = _field(doc, "choices", dict)
    labels = list(choices["label"])
    if answer_key not in labels:
        raise ValueError(f"answerKey {answer_key!r} is not one of choices.label {labels}")
    return list(choices["text"]), labels.index(answer_key)


def _arc(name: str) -> Callable[[dict, int], Item]:
    def build(doc: dict, index: int) -> Item:
        choices, gold = _labelled_choices(doc, _field(doc, "answerKey", str))
        return _same_context(name, index, f"Question: {_field(doc, 'question', str)}\nAnswer:", choices, gold)
    return build


def _openbookqa(doc: dict, index: int) -> Item:
    choices, gold = _labelled_choices(doc, _field(doc, "answerKey", str).lstrip())
    return _same_context("openbookqa", index, _field(doc, "question_stem", str), choices, gold)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    split: str  # the split the paper reports (local file name and hub split)
    hub_path: str  # the Hugging Face dataset lm-eval 0.4.13 reads
    hub_name: str | None
    build: Callable[[dict, int], Item]
    fields: tuple[str, ...]  # what ``build`` reads from a record (dotted: nested)
    calibrated: bool  # the paper scores it by P(completion | context) / P(completion | "Answer:")
    paper_name: str  # column name in the paper's Table 3
    expected_records: int


_ARC_FIELDS = ("question", "choices.text", "choices.label", "answerKey")
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("boolq", "validation", "aps/super_glue", "boolq", _boolq, ("passage", "question", "label"), True,
             "BoolQ", 3270),
    TaskSpec("piqa", "validation", "baber/piqa", None, _piqa, ("goal", "sol1", "sol2", "label"), False, "PIQA",
             1838),
    TaskSpec("siqa", "validation", "lighteval/siqa", None, _siqa,
             ("context", "question", "answerA", "answerB", "answerC", "label"), False, "SIQA", 1954),
    TaskSpec("hellaswag", "validation", "Rowan/hellaswag", None, _hellaswag,
             ("activity_label", "ctx_a", "ctx_b", "endings", "label"), False, "HellaSwag", 10042),
    TaskSpec("winogrande", "validation", "allenai/winogrande", "winogrande_xl", _winogrande,
             ("sentence", "option1", "option2", "answer"), False, "WinoGrande", 1267),
    TaskSpec("arc_easy", "test", "allenai/ai2_arc", "ARC-Easy", _arc("arc_easy"), _ARC_FIELDS, False, "ARC-e", 2376),
    TaskSpec("arc_challenge", "test", "allenai/ai2_arc", "ARC-Challenge", _arc("arc_challenge"), _ARC_FIELDS,
             False, "ARC-c", 1172),
    TaskSpec("openbookqa", "test", "allenai/openbookqa", "main", _openbookqa,
             ("question_stem", "choices.text", "choices.label", "answerKey"), True, "OBQA", 500),
)}

# lm-eval's task names where they differ from ours
LM_EVAL_NAMES = {"siqa": "social_iqa"}


def parse_tasks(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list of task names (lm-eval's ``social_iqa`` is accepted for siqa)."""
    if spec.strip() == "all":
        return list(TASKS)
    aliases = {v: k for k, v in LM_EVAL_NAMES.items()}
    names = []
    for raw in spec.split(","):
        name = aliases.get(raw.strip(), raw.strip())
        if name not in TASKS:
            raise ValueError(f"unknown task {raw.strip()!r}; choose from {', '.join(TASKS)} or 'all'")
        names.append(name)
    return names


def local_file(data_dir: str | Path, task: str) -> Path:
    """``<data_dir>/<task>/<split>.jsonl`` or ``.jsonl.gz``; FileNotFoundError naming both when neither exists."""
    spec = TASKS[task]
    base = Path(data_dir) / task / spec.split
    for candidate in (base.with_suffix(".jsonl"), base.with_suffix(".jsonl.gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no data for task {task!r}: expected {base}.jsonl or {base}.jsonl.gz")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-empty line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadTaskRecord(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BadTaskRecord(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _hub_records(task: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"task {task!r}: no --data-dir given and the `datasets` package is not installed; "
                        "pass --data-dir DIR with <task>/<split>.jsonl files") from None
    spec = TASKS[task]
    dataset = datasets.load_dataset(spec.hub_path, spec.hub_name, split=spec.split)
    for row, record in enumerate(dataset):
        yield f"{spec.hub_path}:{spec.split}#{row}", dict(record)


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """The task's items (the first ``limit`` when given), from ``data_dir`` or from the hub when it is None."""
    spec = TASKS[task]
    if data_dir is not None:
        path = local_file(data_dir, task)
        records = ((f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path))
    else:
        records = _hub_records(task)
    items = []
    for index, (location, record) in enumerate(records):
        if limit is not None and index >= limit:
            break
        missing = _missing_field(record, spec.fields)
        if missing is not None:
            raise BadTaskRecord(f"{location}: missing field {missing!r} (expected {', '.join(spec.fields)})")
        try:
            items.append(spec.build(record, index))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadTaskRecord(f"{location}: bad {task} record: {describe(exc)}") from None
    return items


# lm-eval's yaml for each task, relative to ``lm_eval/tasks``
LM_EVAL_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "siqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def write_lm_eval_tasks(data_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None,
                        prefix: str = "local_") -> dict[str, str]:
    """Task yamls that run lm-evaluation-harness offline on the local files (``--include_path out_dir``).

    Each yaml includes lm-eval's own one (so prompts, targets and processing are lm-eval's) and replaces only the
    dataset with ``dataset_path: json`` on ``<data_dir>/<task>/<split>.jsonl[.gz]``; it asks for both ``acc`` and
    ``acc_norm``. Returns {our task name: lm-eval task name}.
    """
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("lm-evaluation-harness is not installed (pip install 'llamalab[eval]')")
    lm_eval_tasks = Path(spec.origin).parent / "tasks"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks or list(TASKS):
        split = TASKS[task].split
        config = {
            "include": str(lm_eval_tasks / LM_EVAL_YAMLS[task]),
            "task": prefix + task,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(local_file(data_dir, task).resolve())}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
        }
        (out_dir / f"{prefix}{task}.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
        names[task] = prefix + task
    return names
