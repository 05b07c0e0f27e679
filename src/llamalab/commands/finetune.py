"""``llamalab finetune CONFIG.toml [--section.key VALUE ...] [--resume auto|PATH] [--strict]`` and
``llamalab finetune merge RUN_OR_ADAPTER_DIR OUT [--base FOLDER]``.

Under ``torchrun`` every process runs the first form, as with ``llamalab train``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamalab finetune",
        description="Fine-tune a native checkpoint on instruction data (Alpaca or chat records), fully or with "
                    "LoRA, on the training loop of `llamalab train`. Any config key can be overridden as "
                    "--section.key VALUE. `llamalab finetune merge RUN_OR_ADAPTER_DIR OUT` folds a LoRA adapter "
                    "into its base model.",
        epilog="example: llamalab finetune configs/finetune/lora.toml --finetune.base runs/demo/final")
    parser.add_argument("config", help="TOML config (see configs/finetune/)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the newest complete checkpoint in run.out_dir (auto) or a given one")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (default: skip it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamalab finetune merge",
        description="Write a native checkpoint with a LoRA adapter folded into its base (W + scale * B @ A).")
    parser.add_argument("adapter", help="a LoRA run folder (its adapter/) or a PEFT adapter folder")
    parser.add_argument("out", help="native checkpoint folder to write")
    parser.add_argument("--base", help="the base native checkpoint (default: the one adapter_config.json names)")
    parser.add_argument("--force", action="store_true",
                        help="write into an OUT folder that holds other files (none of them is deleted)")
    return parser


def merge(argv: list[str]) -> int:
    from ..finetune.peft_export import ADAPTER_CONFIG, merge_adapter

    args = merge_parser().parse_args(argv)
    adapter = Path(args.adapter)
    if not (adapter / ADAPTER_CONFIG).is_file() and (adapter / "adapter" / ADAPTER_CONFIG).is_file():
        adapter = adapter / "adapter"
    out = merge_adapter(adapter, args.out, base=args.base, force=args.force)
    print(f"merged {adapter} into {out}  (llamalab generate {out} ... / llamalab eval {out} ...)")
    return 0


def summary_lines(result, out_dir: Path) -> list[str]:
    lines = [f"fine-tuned {result.steps} steps, {result.tokens:,} token slots in {result.train_seconds:.0f} s"
             + (f" ({result.skipped_steps} skipped)" if result.skipped_steps else "")]
    if result.val_loss is not None:
        lines.append(f"validation loss {result.val_loss:.4f} nats per response token")
    lines.append(f"throughput {result.tokens_per_s:,.0f} token slots/s, MFU {100 * result.mfu:.1f}% "
                 f"of {result.peak_flops / 1e12:.3f} TFLOP/s")
    if result.plot:
        lines.append(f"loss curve: {result.plot}")
    if (out_dir / "adapter").is_dir():
        lines.append(f"adapter: {out_dir / 'adapter'}  (PEFT layout, for our Hugging Face export)")
    if result.final_dir:
        lines.append(f"model: {result.final_dir}  (llamalab eval {result.final_dir} ... / generate ...)")
    lines.append(f"last checkpoint: {result.checkpoint}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["merge"]:
        return merge(argv[1:])
    args, overrides = build_parser().parse_known_args(argv)
    from ..config import load_config

    if args.resume:
        overrides += ["--checkpoint.resume", args.resume]
    if args.strict:
        overrides += ["--finetune.strict", "true"]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..finetune.task import FinetuneTask
    from ..train.trainer import TrainingDiverged, train

    try:
        result = train(cfg, task=FinetuneTask(cfg))
    except TrainingDiverged as exc:
        print(f"llamalab finetune: stopped: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result, Path(cfg.run.out_dir))))
    return 0
