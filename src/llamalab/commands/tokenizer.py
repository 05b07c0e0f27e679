"""``llamalab tokenizer train|encode|decode|info``: train a BPE tokenizer with LLaMA's settings, or use one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamalab tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)

    t = sub.add_parser("train", help="train a SentencePiece BPE model with LLaMA's trainer settings")
    t.add_argument("--input", nargs="+", action="append", required=True, metavar="FILE_OR_GLOB",
                   help="input files or globs; repeat --input for several sources: each source gets an equal "
                        "share of the sentence budget, so every one is represented. A FORMAT: prefix on the "
                        "first path (jsonl:a.jsonl.gz) sets that source's format")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="folder for tokenizer.model")
    t.add_argument("--format", default="text", choices=["text", "jsonl", "parquet", "gutenberg", "stackexchange"])
    t.add_argument("--text-field", default="text", help="text field of JSONL/Parquet records")
    t.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="training lines sampled in total (default %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true",
                   help="write tokenizer.model into an --output folder that holds other files (none is deleted)")

    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--model", required=True, help="tokenizer.model or a folder holding one")
    e.add_argument("text", nargs="?", help="text to encode (default: standard input)")
    e.add_argument("--no-bos", action="store_true")
    e.add_argument("--json", action="store_true", help="print the ids as a JSON list only")

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--model", required=True)
    d.add_argument("ids", nargs="+", type=int)

    i = sub.add_parser("info", help="vocabulary size, special ids and the trainer settings stored in the model")
    i.add_argument("--model", required=True)
    return p


def _source_format(paths: list[str], default: str) -> tuple[str, list[str]]:
    """``["jsonl:a/*.jsonl", "b.jsonl"]`` -> ``("jsonl", ["a/*.jsonl", "b.jsonl"])``."""
    from ..data.readers import FORMATS

    prefix, sep, rest = paths[0].partition(":")
    if sep and prefix in FORMATS:
        return prefix, [rest, *paths[1:]]
    return default, paths


def _train(args) -> int:
    from ..data.readers import read_documents
    from ..errors import UserError
    from ..fs import check_output_folder
    from ..tokenizer import TOKENIZER_FILE, Tokenizer, model_settings, sample_sources, train_tokenizer

    check_output_folder(Path(args.output), (TOKENIZER_FILE,), "tokenizer folder", force=args.force)  # before reading
    started = time.perf_counter()
    errors: list[tuple[str, str]] = []
    sources = {}
    for n, paths in enumerate(args.input):
        fmt, paths = _source_format(paths, args.format)
        sources[f"source{n}"] = (d.text for d in read_documents(
            paths, fmt, source=f"source{n}", text_field=args.text_field,
            on_error=lambda loc, why: errors.append((loc, why))))
    samples = sample_sources(sources, args.max_sentences, seed=args.seed)
    for loc, why in errors[:5]:
        print(f"skipped bad record {loc}: {why}", file=sys.stderr)
    for (name, sample), paths in zip(samples.items(), args.input):
        if not sample:
            raise UserError(f"--input {' '.join(paths)}: no text in these files")
        print(f"{name}: {len(sample)} sentences from {' '.join(paths)}")
    texts = [s for sample in samples.values() for s in sample]
    path = train_tokenizer(texts, args.vocab_size, args.output, max_sentences=len(texts), seed=args.seed,
                           force=args.force)
    tok = Tokenizer(path)
    settings = model_settings(path)
    print(f"wrote {path}: vocab {tok.vocab_size}, {settings['model_type']}, split_digits={settings['split_digits']}, "
          f"byte_fallback={settings['byte_fallback']}, {len(errors)} bad records skipped, "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action == "train":
        return _train(args)

    from ..errors import UserError
    from ..tokenizer import Tokenizer, model_settings

    tok = Tokenizer(args.model)
    if args.action == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tok.encode(text, bos=not args.no_bos)
        if args.json:
            print(json.dumps(ids))
        else:
            print(f"{len(ids)} tokens")
            for i in ids:
                print(f"{i}\t{tok.id_to_piece(i)!r}")
    elif args.action == "decode":
        bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise UserError(f"ids {bad} are not in {tok.path}'s vocabulary: expected 0 to {tok.vocab_size - 1}")
        print(tok.decode(args.ids))
    else:
        print(json.dumps({"path": str(tok.path), **tok.special_ids(), **model_settings(tok.path)}, indent=2))
    return 0
