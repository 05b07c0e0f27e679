"""``llamalab serve CHECKPOINT``: an OpenAI-compatible HTTP server (completions, chat, streaming) with
continuous batching over ``--slots`` rows of one key/value cache. Needs the ``serve`` extra
(``pip install -e '.[serve]'``). See docs/serve.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamalab serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="native checkpoint folder (config.json, model.safetensors, tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (rows of the batched cache)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it the server answers 429")
    p.add_argument("--context", type=int, default=None,
                   help="positions per slot (prompt + completion; default and maximum: the model's max_seq_len)")
    p.add_argument("--model-name", default=None, help="the name clients ask for (default: the folder's name)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the stored dtype")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only quantization of the linear layers (per-channel scales)")
    p.add_argument("--compile", action="store_true", help="compile the batched decode step (at start-up)")
    p.add_argument("--api-key", default=os.environ.get("LLAMALAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and the tokenizer endpoints "
                        "(default: $LLAMALAB_API_KEY; none: open)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llamalab.errors import UserError

    try:
        import uvicorn
    except ImportError:
        raise UserError("llamalab serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    if args.slots < 1 or args.max_queue < 0:
        raise UserError(f"--slots must be >= 1 and --max-queue >= 0 (got {args.slots}, {args.max_queue})")
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    served = load_served(args)
    from llamalab.serve.app import create_app

    engine = served.engine
    print(f"llamalab serve: {served.model_name} on http://{args.host}:{args.port}/v1 ({len(engine.slots)} slots of "
          f"{engine.context} positions; chat format: {served.chat.name})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def load_served(args):
    """The checkpoint, its backend (compiled and warmed up when asked) and the engine over it."""
    import llamalab
    from llamalab.errors import UserError
    from llamalab.serve.app import Served
    from llamalab.serve.chat import ChatFormat
    from llamalab.serve.engine import Engine, Request, Sampling

    pretrained = llamalab.load(args.checkpoint, dtype=args.dtype, device=args.device)
    tok = pretrained.tokenizer
    if tok is None:
        raise UserError(f"{args.checkpoint}: no tokenizer.model; the server needs one to turn text into tokens")
    if args.quantize == "int8":
        from llamalab.inference.quantize import quantize_int8

        quantize_int8(pretrained.model)
    if args.context is not None and not 2 <= args.context <= pretrained.args.max_seq_len:
        raise UserError(f"--context must be between 2 and the model's max_seq_len={pretrained.args.max_seq_len}, "
                        f"got {args.context}")
    backend = pretrained.accelerate(compile=args.compile)
    engine = Engine(backend, slots=args.slots, eos_ids=[tok.eos_id], context=args.context,
                    max_queue=args.max_queue)
    warm = engine.submit(Request([max(tok.bos_id, 0)], Sampling(max_tokens=2)))  # compiles a compiled step now
    for _ in warm.events():
        pass
    name = args.model_name or Path(args.checkpoint).resolve().name
    chat = ChatFormat(tok, pretrained.chat_template)
    return Served(engine=engine, tokenizer=tok, chat=chat, model_name=name, api_key=args.api_key)
