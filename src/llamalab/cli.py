"""``llamalab <command> ...``: a thin dispatcher; each command lives in ``llamalab.commands.<name>``.

Every command module exposes ``main(argv: list[str]) -> int`` and parses its own arguments, so commands
with free-form overrides (``train CONFIG --section.key value``) need no special casing here.

A user error (``llamalab.errors.UserError``, and the ``ValueError`` / ``OSError`` a bad file or flag raises) is
printed as one line, ``llamalab <command>: error: ...``, with exit status 2; any other exception is a bug and
keeps its traceback. ``--debug`` (anywhere on the command line) or ``LLAMALAB_DEBUG=1`` shows the traceback of
user errors too.
"""

from __future__ import annotations

import importlib
import os
import sys

from .errors import UserError, describe

USER_ERRORS = (UserError, ValueError, OSError)

COMMANDS = {
    "data": "prepare training data: clean, deduplicate, tokenize and shard a source mixture",
    "tokenizer": "train or inspect a SentencePiece BPE tokenizer with LLaMA's settings",
    "train": "pretrain a model from a TOML config (torchrun for several processes)",
    "finetune": "instruction-tune a checkpoint, fully or with LoRA; `finetune merge` folds an adapter in",
    "plan": "estimate per-GPU memory of a training config for a parallel layout",
    "eval": "zero-shot common-sense benchmarks and perplexity",
    "generate": "generate text from a checkpoint (one-shot or interactive)",
    "serve": "an OpenAI-compatible HTTP server with continuous batching",
    "convert": "convert checkpoints between native, Hugging Face, Meta, llama2.c and GGUF",
    "demo": "prepare the built-in corpus, train the demo model for a few minutes, sample from it",
    "scaling": "compute-budgeted sweeps of training runs and the Chinchilla fits through them",
}

HAS_ACTIONS = {"data", "tokenizer", "scaling"}  # `llamalab data prepare ...`: errors name the action too


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llamalab <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, desc in COMMANDS.items()]
    lines += ["", "Run `llamalab <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"llamalab {__version__}")
        return 0
    debug = "--debug" in argv or os.environ.get("LLAMALAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llamalab: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llamalab.commands.{name}")
    try:
        return int(module.main(rest) or 0)
    except USER_ERRORS as exc:
        if debug:
            raise
        action = f" {rest[0]}" if name in HAS_ACTIONS and rest and not rest[0].startswith("-") else ""
        print(f"llamalab {name}{action}: error: {describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llamalab {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
