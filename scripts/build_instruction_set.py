"""Build llamalab's small instruction set (``src/llamalab/assets/instructions/science_qa.jsonl``) and the
held-out evaluation folder it is measured on, from ``../shared/data/eval``.

``../shared/data`` holds the evaluation splits only, no training splits, so the set is made of:

- ARC-Easy (CC BY-SA 4.0): its 2,376 test questions are split by a fixed seed into 1,376 for training and
  1,000 held out; ``--heldout DIR`` writes the held-out ones as ``DIR/arc_easy/test.jsonl`` for
  ``llamalab eval --data-dir DIR`` (scores on them are not comparable with the paper's full test set);
- OpenBookQA (Apache-2.0): its official 500-question validation split for training, its test split
  (copied to ``DIR/openbookqa/test.jsonl``) held out as in the paper.

Each record is Alpaca-shaped: ``instruction`` is the zero-shot prompt lm-evaluation-harness builds for the
question (``llamalab.eval.tasks``), ``output`` the correct choice, plus its ``source`` and ``id``. With
``finetune.template = "plain"`` a model is trained on exactly the continuation the evaluation scores; the
default Alpaca template wraps the prompt in its instruction format. Deterministic; run from the repository
root::

    .venv/bin/python scripts/build_instruction_set.py [--eval ../shared/data/eval] [--heldout data/science_eval]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from llamalab.eval.tasks import TASKS, load_task, local_file, read_jsonl

REPO = Path(__file__).resolve().parents[1]
ARC_HELD_OUT = 1000
SEED = 0


def record(item, source: str, row_id: str) -> dict:
    """lm-eval's prompt for the question and the text of its correct choice."""
    return {"instruction": item.contexts[item.gold], "output": item.choices[item.gold], "source": source,
            "id": row_id}


def arc_easy(eval_dir: Path) -> tuple[list[dict], list[dict]]:
    """(our records, the raw rows) of ARC-Easy's test split."""
    rows = [r for _, r in read_jsonl(local_file(eval_dir, "arc_easy"))]
    return [record(item, "arc_easy/test", row["id"]) for item, row in zip(load_task("arc_easy", eval_dir), rows)], rows


def openbookqa_validation(eval_dir: Path) -> list[dict]:
    """OpenBookQA's validation split, prompted as lm-eval prompts its test split."""
    build = TASKS["openbookqa"].build
    return [record(build(row, i), "openbookqa/validation", row["id"])
            for i, (_, row) in enumerate(read_jsonl(eval_dir / "openbookqa" / "validation.jsonl"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", default=str(REPO.parent / "shared" / "data" / "eval"), help="evaluation sets")
    parser.add_argument("--out", default=str(REPO / "src" / "llamalab" / "assets" / "instructions"))
    parser.add_argument("--heldout", help="also write the held-out evaluation folder here")
    args = parser.parse_args()
    eval_dir, out = Path(args.eval), Path(args.out)

    arc, arc_rows = arc_easy(eval_dir)
    held = set(np.random.default_rng(SEED).permutation(len(arc))[:ARC_HELD_OUT].tolist())
    train = [r for i, r in enumerate(arc) if i not in held] + openbookqa_validation(eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "science_qa.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    print(f"{out / 'science_qa.jsonl'}: {len(train)} records ({len(arc) - len(held)} ARC-Easy, "
          f"{len(train) - len(arc) + len(held)} OpenBookQA)")
    if args.heldout:
        heldout = Path(args.heldout)
        (heldout / "arc_easy").mkdir(parents=True, exist_ok=True)
        (heldout / "openbookqa").mkdir(parents=True, exist_ok=True)
        kept = [r for i, r in enumerate(arc_rows) if i in held]
        (heldout / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        shutil.copyfile(local_file(eval_dir, "openbookqa"), heldout / "openbookqa" / "test.jsonl")
        print(f"{heldout}: {len(kept)} held-out ARC-Easy questions, OpenBookQA's test split")


if __name__ == "__main__":
    main()
