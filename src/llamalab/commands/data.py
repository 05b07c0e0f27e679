"""``llamalab data prepare [RECIPE.toml]`` and ``llamalab data info DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _prepare(args) -> int:
    from ..data.prepare import RecipeError, prepare
    from ..data.readers import BadRecord

    try:
        out = prepare(args.recipe, args.output, strict=args.strict, workers=args.workers, force=args.force)
    except (BadRecord, RecipeError, FileNotFoundError, ValueError) as exc:
        print(f"llamalab data prepare: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    _summary(out)
    return 0


def _summary(folder) -> None:
    from ..data.prepare import load_manifest

    m = load_manifest(folder)
    print(f"{m['name']}: vocab {m['vocab_size']} ({m['dtype']}), {m['totals']['train_tokens']:,} train / "
          f"{m['totals']['validation_tokens']:,} validation tokens; epochs for {m['token_budget']:,} tokens:")
    print(f"  {'source':<16}{'share':>8}{'epochs':>8}{'docs read':>11}{'dropped':>9}{'bad':>6}{'train tok':>12}"
          f"{'val tok':>10}")
    for name, s in m["sources"].items():
        splits = s["splits"]
        print(f"  {name:<16}{s['proportion']:>8.1%}{s['epochs']:>8.2f}{s['documents_read']:>11,}"
              f"{sum(s['dropped'].values()):>9,}{s['bad_records']:>6,}{splits['train']['tokens']:>12,}"
              f"{splits.get('validation', {}).get('tokens', 0):>10,}")


def _info(args) -> int:
    from ..data.prepare import load_manifest

    try:
        manifest = load_manifest(args.folder)
    except (FileNotFoundError, ValueError) as exc:
        print(f"llamalab data info: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest, indent=2, ensure_ascii=False))
    else:
        _summary(args.folder)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llamalab data", description="prepare and inspect training data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="clean, deduplicate, tokenize and shard the sources of a recipe",
                       description="Without a recipe, prepares the built-in multi-source corpus into "
                                   "$LLAMALAB_CACHE/data/default (~/.cache/llamalab/data/default).")
    p.add_argument("recipe", nargs="?", help="recipe TOML (see docs/data.md); default: the built-in corpus")
    p.add_argument("--output", help="prepared folder (default: the recipe's `output`, else the cache)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--workers", type=int, default=2, help="tokenizer worker processes (default 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date copy exists")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the prepared folder and summary")
    p.set_defaults(func=_prepare)
    i = sub.add_parser("info", help="summarize a prepared folder's manifest")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_info)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    return args.func(args)
