"""``llamalab eval CHECKPOINT``: the paper's zero-shot common-sense tasks, or perplexity of a text file."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamalab eval",
        description="Zero-shot BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and OpenBookQA with "
                    "lm-evaluation-harness's prompts (acc, acc_norm) and the LLaMA paper's scoring; or "
                    "perplexity of a text file.")
    p.add_argument("checkpoint", help="native llamalab checkpoint folder (config.json, model.safetensors, "
                                      "tokenizer.model)")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all' (default)")
    p.add_argument("--data-dir", default=os.environ.get("LLAMALAB_EVAL_DATA"),
                   help="folder with <task>/<split>.jsonl[.gz] (default $LLAMALAB_EVAL_DATA; without it the "
                        "Hugging Face hub is used through `datasets`)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--scoring", choices=("lm-eval", "paper"), default="lm-eval",
                   help="table columns: lm-eval's acc/acc_norm, or the paper's protocol (JSON has all three)")
    p.add_argument("--batch-size", type=int, default=32, help="continuations per forward batch (default 32)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="model precision (bf16 is ~4x faster on CPUs with AVX-512 BF16; elsewhere its products run "
                        "in fp32 and it stays slower than fp32; log-softmax stays fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", help="write results (per-example predictions and log-likelihoods) as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--perplexity", metavar="FILE", help="instead of the tasks: perplexity of this UTF-8 text file")
    p.add_argument("--context", type=int, default=None, help="perplexity window in tokens (default: model's)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens scored per window after the first (default: --context, disjoint windows)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import llamalab
    from llamalab.errors import UserError
    from llamalab.eval.harness import Evaluator, evaluate_tasks
    from llamalab.eval.scoring import markdown_table, matching_preset
    from llamalab.eval.tasks import parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # before the scoring, not after it
        raise UserError(f"--output {args.output}: its folder does not exist")
    if args.perplexity and not Path(args.perplexity).is_file():
        raise UserError(f"--perplexity {args.perplexity}: no such file")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pre = llamalab.load(args.checkpoint, dtype=dtype, device=args.device)
    if pre.tokenizer is None:
        raise UserError(f"{args.checkpoint}: no tokenizer.model; eval needs one to turn the text into tokens")
    evaluator = Evaluator(pre.model, pre.tokenizer, batch_size=args.batch_size, progress=not args.no_progress)
    # its product mode: bf16 weights multiplied in fp32 on a CPU without native bf16 (4.7x faster for `small`)
    backend = pre.accelerate()

    if args.perplexity:
        from llamalab.eval.perplexity import perplexity_file

        with backend.products():
            report = perplexity_file(evaluator, args.perplexity, context=args.context, stride=args.stride)
        print(f"{report['file']}: {report['tokens']} tokens, {report['bytes']} bytes, context {report['context']}, "
              f"stride {report['stride']}")
        print(f"nats/token {report['nats_per_token']:.4f}  perplexity {report['perplexity']:.3f}  "
              f"bits/byte {report['bits_per_byte']:.4f}")
        if args.output:
            Path(args.output).write_text(json.dumps({"checkpoint": str(args.checkpoint), **report}, indent=2) + "\n")
        return 0

    start = time.perf_counter()
    with backend.products():
        out = evaluate_tasks(evaluator, tasks, args.data_dir, args.limit)
    seconds = time.perf_counter() - start
    preset = matching_preset(pre.args)
    print(markdown_table(out["results"], args.scoring, preset))
    n = sum(r["n"] for r in out["results"].values())
    print(f"\n{n} examples in {seconds:.1f} s ({n / seconds:.1f} examples/s), dtype {args.dtype}")
    if args.output:
        report = {"checkpoint": str(args.checkpoint), "preset": preset, "scoring": args.scoring,
                  "dtype": args.dtype, "limit": args.limit, "data_dir": args.data_dir, "seconds": seconds, **out}
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0
