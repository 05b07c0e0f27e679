"""``llamalab demo``: prepare the built-in corpus, train the ``demo`` model for a few minutes, sample from it."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo.toml"
PROMPTS = ["The history of", "def fibonacci(n):", "Once upon a time"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamalab demo", description=__doc__)
    parser.add_argument("--minutes", type=float, default=None, help="training time (default: configs/demo.toml)")
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    args, overrides = parser.parse_known_args(argv)
    if args.minutes is not None:
        overrides += ["--length.max_minutes", str(args.minutes)]
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .. import load
    from ..config import ConfigError, load_config
    from ..data.prepare import prepare
    from ..train.trainer import train
    from .train import summary_lines

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"llamalab demo: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print("[1/3] preparing the built-in corpus and tokenizer (cached after the first run) ...", flush=True)
    prepared = prepare(cfg.data.recipe or None, output=cfg.data.prepared or None)
    print(f"      {prepared} ready in {time.perf_counter() - start:.0f} s", flush=True)
    cfg.data.prepared, cfg.data.recipe = str(prepared), ""
    print(f"[2/3] training the {cfg.model.preset!r} model for {cfg.length.max_minutes:g} minutes ...", flush=True)
    result = train(cfg)
    print("[3/3] sampling from the trained model ...", flush=True)
    model = load(result.final_dir)
    samples = model.generate(PROMPTS, max_new_tokens=48, temperature=0.8, top_k=50, seed=0)
    print()
    print("\n".join(summary_lines(result)))
    for prompt, text in zip(PROMPTS, samples):
        print(f"\n--- {prompt!r}\n{prompt}{text}")
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} minutes")
    return 0
