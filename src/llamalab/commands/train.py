"""``llamalab train CONFIG.toml [--section.key VALUE ...] [--resume auto|PATH]``.

Under ``torchrun`` every process runs this; RANK / WORLD_SIZE / LOCAL_RANK come from the environment.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamalab train",
        description="Pretrain a LLaMA model from a TOML config. Any config key can be overridden as "
                    "--section.key VALUE (VALUE is read as a TOML value: 3, 1e-4, true, \"text\").",
        epilog="example: llamalab train configs/demo.toml --length.max_minutes 2 --optimizer.lr 1e-3")
    parser.add_argument("config", help="TOML config (see configs/)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the newest complete checkpoint in run.out_dir (auto) or a given one")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def summary_lines(result) -> list[str]:
    lines = [f"trained {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds:.0f} s"
             + (f" ({result.skipped_steps} skipped)" if result.skipped_steps else "")]
    if result.val_loss is not None:
        lines.append(f"validation loss {result.val_loss:.4f} nats/token, {result.val_bpb:.4f} bits/byte "
                     f"({result.val_loss_per_byte:.4f} nats/byte)")
    lines.append(f"throughput {result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}% "
                 f"of {result.peak_flops / 1e12:.3f} TFLOP/s"
                 + (f"; after the first step (compile, warm-up): {result.steady_tokens_per_s:,.0f} tokens/s, "
                    f"MFU {100 * result.steady_mfu:.1f}%" if result.steady_tokens_per_s else ""))
    if result.plot:
        lines.append(f"loss curve: {result.plot}")
    if result.final_dir:
        lines.append(f"model: {result.final_dir}  (llamalab generate {result.final_dir} ...)")
    lines.append(f"last checkpoint: {result.checkpoint}")
    return lines


def main(argv: list[str]) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    from ..config import ConfigError, load_config

    if args.resume:
        overrides += ["--checkpoint.resume", args.resume]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"llamalab train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..train.trainer import TrainingDiverged, train

    try:
        result = train(cfg)
    except ConfigError as exc:
        print(f"llamalab train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"llamalab train: stopped: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result)))
    return 0
