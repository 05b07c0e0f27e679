"""``llamalab generate CHECKPOINT --prompt TEXT``: sample text from a native checkpoint folder.

One prompt streams its continuation as it is decoded; several ``--prompt`` flags decode as one batch and
print each result; ``--interactive`` reads one prompt per line from stdin until end of input.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamalab generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="native checkpoint folder (config.json, model.safetensors, tokenizer.model)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue; repeat for a batch (default: an empty prompt, BOS only)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", action="append", default=None, help="stop at this string (repeatable)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the stored dtype")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only quantization of the linear layers (per-channel scales)")
    p.add_argument("--compile", action="store_true", help="compile the single-token decode step")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import llamalab
    from llamalab.errors import UserError, describe

    if args.prompt and args.interactive:
        raise UserError("give --prompt or --interactive, not both")
    pretrained = llamalab.load(args.checkpoint, dtype=args.dtype, device=args.device)
    if pretrained.tokenizer is None:
        raise UserError(f"{args.checkpoint}: no tokenizer.model; generate needs one to turn text into tokens")
    if args.quantize == "int8":
        from llamalab.inference.quantize import quantize_int8

        quantize_int8(pretrained.model)
    pretrained.accelerate(compile=args.compile)  # now: a compiling backend checks the torch internals it needs
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop, compile=args.compile)

    def run_one(prompt: str) -> None:
        pieces = pretrained.generate(prompt, stream=True, **options)  # checks the lengths before printing
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()

    if args.interactive:
        tty = sys.stdin.isatty()
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            prompt = line.rstrip("\n")
            if prompt:
                try:
                    run_one(prompt)
                except ValueError as exc:  # e.g. a prompt too long for the context: say so, keep going
                    print(f"llamalab generate: error: {describe(exc)}", file=sys.stderr)
    elif args.prompt and len(args.prompt) > 1:
        for prompt, text in zip(args.prompt, pretrained.generate(args.prompt, **options)):
            print(prompt + text)
            print()
    else:
        run_one(args.prompt[0] if args.prompt else "")
    return 0
