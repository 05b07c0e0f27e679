"""Build llamalab's built-in corpus (``src/llamalab/assets/corpus/*.jsonl.zst``) from ``../shared/data/raw``.

Runs llamalab's own pipeline stage 1 (``llamalab.data.prepare.clean_documents``: readers, per-source cleaners,
exact and MinHash near-duplicate removal at Jaccard 0.9, as the paper does for books), then cuts books into
~8,000-character pieces at paragraph breaks (so a validation split by document hash has something to hold
out) and writes one zstd-compressed JSONL file per source with each record's provenance (``id``, and ``url``
for the CC BY-SA sources, which their attribution requires). Deterministic: the same raw files give the same
bytes. Run from the repository root::

    .venv/bin/python scripts/build_default_corpus.py [--raw ../shared/data/raw] [--out src/llamalab/assets/corpus]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import zstandard

from llamalab.data.prepare import DedupSpec, Recipe, SourceSpec, TokenizerSpec, clean_documents

REPO = Path(__file__).resolve().parents[1]
BOOK_PIECE_CHARS = 8000
# Character budget per source (after cleaning). Books and code are capped, taking whole books / files in
# reader order, so the package stays a few MB; Wikipedia and StackExchange are kept whole.
BUDGET = {"books": 4_000_000, "wikipedia": None, "code": 2_000_000, "stackexchange": None}


def build_recipe(raw: Path) -> Recipe:
    def paths(*globs):
        return [str(raw / g) for g in globs]

    sources = [
        SourceSpec("books", paths("books/*.txt", "books/nltk_gutenberg/*.txt"), "gutenberg", cleaner="books",
                   proportion=1),
        SourceSpec("wikipedia", paths("wikipedia/*.jsonl"), "jsonl", cleaner="wikipedia", proportion=1),
        SourceSpec("code", paths("code/*.jsonl"), "jsonl", cleaner="code", proportion=1),
        SourceSpec("stackexchange", paths("stackexchange/*_Posts.xml"), "stackexchange", cleaner="stackexchange",
                   proportion=1),
    ]
    return Recipe("default-corpus-build", sources, TokenizerSpec(), DedupSpec(exact=True, near_threshold=0.9))


def book_pieces(text: str, size: int = BOOK_PIECE_CHARS):
    """Consecutive pieces of about ``size`` characters, cut at a blank line, or at any line break once a piece
    reaches twice that (books such as Botchan have no blank lines)."""
    piece: list[str] = []
    length = 0
    for line in text.split("\n"):
        if length >= 2 * size or (length >= size and not line.strip()):
            yield "\n".join(piece).strip("\n")
            piece, length = [], 0
        piece.append(line)
        length += len(line) + 1
    if "\n".join(piece).strip():
        yield "\n".join(piece).strip("\n")


def records(spec, doc, text):
    """The corpus records of one kept document, with provenance."""
    meta = doc.meta
    if spec.name == "books":
        name = Path(meta["path"]).name
        for i, piece in enumerate(book_pieces(text)):
            yield {"id": f"{name}#{i}", "text": piece}
    elif spec.name == "wikipedia":
        title = meta["title"]
        yield {"id": f"wiki:{title}", "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_"),
               "text": f"{title}\n\n{text}"}
    elif spec.name == "code":
        yield {"id": meta["path"], "text": text}
    else:
        yield {"id": doc.doc_id, "url": f"https://{meta['site']}/questions/{meta['question_id']}", "text": text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=REPO.parent / "shared" / "data" / "raw")
    parser.add_argument("--out", type=Path, default=REPO / "src" / "llamalab" / "assets" / "corpus")
    parser.add_argument("--level", type=int, default=19, help="zstd compression level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    recipe = build_recipe(args.raw)
    stats: dict = {}
    buffers = {s.name: io.StringIO() for s in recipe.sources}
    chars = dict.fromkeys(buffers, 0)
    counts = dict.fromkeys(buffers, 0)
    full = set()
    for spec, doc, text in clean_documents(recipe, stats):
        budget = BUDGET[spec.name]
        if spec.name in full:
            continue
        if budget is not None and chars[spec.name] + len(text) > budget and chars[spec.name]:
            full.add(spec.name)
            continue
        for rec in records(spec, doc, text):
            buffers[spec.name].write(json.dumps(rec, ensure_ascii=False) + "\n")
            chars[spec.name] += len(rec["text"])
            counts[spec.name] += 1
    args.out.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=args.level)
    summary = {}
    for name, buf in buffers.items():
        data = compressor.compress(buf.getvalue().encode("utf-8"))
        (args.out / f"{name}.jsonl.zst").write_bytes(data)
        st = stats[name]
        summary[name] = {"records": counts[name], "chars": chars[name], "compressed_bytes": len(data),
                         "raw_documents_read": st.read, "raw_documents_kept": st.kept,
                         "dropped": dict(st.dropped), "bad_records": st.bad}
        print(f"{name:<14} {counts[name]:>6} records {chars[name]:>10,} chars -> {len(data):>9,} bytes  "
              f"(read {st.read}, kept {st.kept}, dropped {dict(st.dropped)})")
    (args.out / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
