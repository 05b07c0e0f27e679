"""Zero-shot evaluation speed: llamalab's harness against lm-evaluation-harness's ``hf`` backend.

Same weights (a random model of the chosen preset, exported to a Hugging Face folder with ``export_hf``), same
items (the first ``--limit`` of each task from the shared eval files), same dtype, in one run; the two are
alternated ``--repeats`` times and the medians compared. lm-eval's task objects are built once outside the timed
region (dataset loading is not counted against it); llamalab's time includes reading its JSONL files and, for
BoolQ and OpenBookQA, the extra "Answer:" requests of the paper's scoring that lm-eval does not make.

    .venv/bin/python bench/eval.py                # stories15m shape, 100 items x 4 tasks, fp32 and bf16
    .venv/bin/python bench/eval.py --quick        # smoke run: tiny preset, 8 items, one repeat
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="stories15m")
    p.add_argument("--tasks", default="hellaswag,piqa,arc_easy,boolq")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=str(SHARED / "eval"))
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece model (default: Meta's LLaMA tokenizer from ../shared, else stories260K's)")
    p.add_argument("--quick", action="store_true", help="tiny preset, 8 items, one repeat, fp32 only")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.limit, args.repeats, args.dtypes = "tiny", 8, 1, "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from llamalab.checkpoint import save_pretrained
    from llamalab.convert.hf import export_hf
    from llamalab.eval.harness import Evaluator, evaluate_tasks
    from llamalab.eval.tasks import parse_tasks, write_lm_eval_tasks
    from llamalab.inference.backend import accelerate
    from llamalab.model import build_model, preset_args
    from llamalab.tokenizer import Tokenizer

    tasks = parse_tasks(args.tasks)
    tok_path = Path(args.tokenizer) if args.tokenizer else None
    if tok_path is None:
        meta = SHARED / "tokenizers" / "llama" / "tokenizer.model"
        tok_path = meta if meta.is_file() else SHARED / "weights" / "stories260K" / "tok512.reconstructed.model"
    tokenizer = Tokenizer(tok_path)
    model_args = preset_args(args.preset)
    if model_args.vocab_size < tokenizer.vocab_size:
        model_args = preset_args(args.preset, vocab_size=tokenizer.vocab_size)
    model = build_model(model_args, seed=0).eval()

    results = {"preset": args.preset, "tasks": tasks, "limit": args.limit, "tokenizer": str(tok_path),
               "threads": torch.get_num_threads(), "runs": {}}
    n_items = args.limit * len(tasks)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_pretrained(tmp / "native", model, tok_path)
        export_hf(tmp / "native", tmp / "hf")
        names = write_lm_eval_tasks(args.data_dir, tmp / "yamls", tasks)
        task_dict = get_task_dict(list(names.values()), TaskManager(include_path=str(tmp / "yamls")))
        for dtype_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            hf = HFLM(pretrained=str(tmp / "hf"), dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype_name],
                      batch_size=args.batch_size, device="cpu")
            ours = Evaluator(build_model(model_args, seed=0).to(dtype).eval(), tokenizer,
                             batch_size=args.batch_size, progress=False)
            backend = accelerate(ours.scorer.model)  # the eval command's product mode
            times = {"llamalab": [], "lm-eval hf": []}
            for _ in range(args.repeats):
                start = time.perf_counter()
                with backend.products():
                    evaluate_tasks(ours, tasks, args.data_dir, args.limit)
                times["llamalab"].append(time.perf_counter() - start)
                start = time.perf_counter()
                lm_eval.simple_evaluate(model=hf, tasks=list(task_dict.values()), limit=args.limit,
                                        verbosity="ERROR")
                times["lm-eval hf"].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            run = {k: {"seconds": v, "median_s": med[k], "examples_per_s": n_items / med[k]} for k, v in times.items()}
            run["speedup"] = med["lm-eval hf"] / med["llamalab"]
            results["runs"][dtype_name] = run
            del hf

    print(f"\n{args.preset} ({model_args.num_params() / 1e6:.1f}M params), {len(tasks)} tasks x {args.limit} items, "
          f"{results['threads']} threads, median of {args.repeats}")
    print("| dtype | llamalab ex/s | lm-eval hf ex/s | speedup |")
    print("|---|---|---|---|")
    for dtype_name, run in results["runs"].items():
        print(f"| {dtype_name} | {run['llamalab']['examples_per_s']:.1f} | {run['lm-eval hf']['examples_per_s']:.1f} "
              f"| {run['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
