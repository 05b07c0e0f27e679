"""``llamalab data prepare``: raw sources -> cleaned, deduplicated, tokenized shards with a manifest.

Pipeline: read (``llamalab.data.readers``) -> clean (``cleaners``) -> deduplicate (``dedup``, in this process,
because seen-before state is global) -> split train/validation by a hash of each document's text (or by
position, ``split = "tail"``) -> train a tokenizer on a sample of the train split if the recipe asks for one ->
tokenize in worker processes -> shards (``llamalab.data.shards``) + ``manifest.json`` + ``COMPLETE``.

Everything is written into a temporary folder beside the output and renamed into place at the end, so a crash
never leaves a folder that looks complete. Re-running with an unchanged recipe and inputs is a no-op (the
manifest records a hash of both); any change rebuilds from scratch.

A recipe is TOML; relative paths are relative to the recipe file (symlinks resolved)::

    name = "mix"                      # optional, default: the file name
    output = "prepared/mix"           # optional, default: <cache>/data/<name>; --output overrides
    validation_fraction = 0.01        # share of documents held out (by text hash)
    token_budget = 1_000_000_000      # optional: training tokens the "epochs" column is computed for
    seed = 0

    [tokenizer]                       # either an existing SentencePiece model ...
    path = "tokenizer.model"
    # ... or train one on a sample of the train split, every source by its proportion:
    # vocab_size = 4096
    # sample_chars = 3_000_000

    [dedup]
    exact = true                      # drop documents whose normalized text was seen before (any source)
    line = false                      # CCNet-style: drop lines seen before (per source; overridable)
    near_threshold = 0.9              # MinHash LSH Jaccard threshold; 0 disables
    num_perm = 128
    ngram = 5

    [[sources]]
    name = "books"
    paths = ["raw/books/*.txt"]       # files or globs
    format = "gutenberg"              # text | jsonl | parquet | stackexchange | gutenberg
    text_field = "text"               # jsonl / parquet
    cleaner = "books"                 # web | code | wikipedia | books | arxiv | stackexchange | none
    proportion = 0.3                  # sampling share (normalized over sources) ...
    # epochs = 2.0                    # ... or passes over this source within token_budget
    # split = "tail"; val_fraction = 0.1   # hold out the last 10% of characters instead of whole documents
    # paragraphs = true               # text format: one document per blank-line separated paragraph
    # line_dedup = true; near_dedup = false  # per-source overrides of [dedup]
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import numpy as np

from ..errors import UserError
from .shards import (
    COMPLETE_NAME,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    ShardWriter,
    finish_prepared,
    split_entry,
    token_dtype,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when the same recipe would produce different shards
MAX_BAD_RECORDS_LISTED = 10
CHUNK_CHARS = 1 << 20  # text per tokenization task sent to a worker
DEFAULT_RECIPE = "assets/corpus/default.toml"


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


def cache_dir() -> Path:
    """``$LLAMALAB_CACHE`` or ``~/.cache/llamalab``."""
    return Path(os.environ.get("LLAMALAB_CACHE", Path.home() / ".cache" / "llamalab")).expanduser()


def default_prepared_dir() -> Path:
    """Where ``llamalab data prepare`` with no recipe puts the built-in corpus."""
    return cache_dir() / "data" / "default"


def default_recipe_path() -> Path:
    return Path(str(resources.files("llamalab") / DEFAULT_RECIPE))


# ----------------------------------------------------------------------------------------------- recipe


@dataclass
class SourceSpec:
    name: str
    paths: list[str]
    format: str
    text_field: str = "text"
    cleaner: str = "none"
    cleaner_options: dict = field(default_factory=dict)
    proportion: float | None = None
    epochs: float | None = None
    split: str = "hash"
    val_fraction: float | None = None
    paragraphs: bool = False
    line_dedup: bool | None = None
    near_dedup: bool | None = None


@dataclass
class TokenizerSpec:
    path: str | None = None
    vocab_size: int | None = None
    sample_chars: int = 3_000_000
    max_sentences: int | None = None


@dataclass
class DedupSpec:
    exact: bool = True
    line: bool = False
    near_threshold: float = 0.0
    num_perm: int = 128
    ngram: int = 5


@dataclass
class Recipe:
    name: str
    sources: list[SourceSpec]
    tokenizer: TokenizerSpec
    dedup: DedupSpec = field(default_factory=DedupSpec)
    output: str | None = None
    validation_fraction: float = 0.01
    token_budget: int | None = None
    seed: int = 0
    path: str | None = None


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list[str]: "a string or a list of strings", dict: "a table"}


def _fits(value, hint) -> bool:
    """Whether a TOML value fits a field's annotation: a bool is not a number, an integer is a float."""
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(item, get_args(hint)[0]) for item in value)
    return isinstance(value, hint)


def _build(cls, table: dict, where: str):
    """A recipe dataclass from its TOML table, every value checked against the field's annotation here so
    that a wrong type is an error naming the key, not a TypeError deep in the pipeline (or silently kept).
    A lone string stands for a one-element list of strings."""
    _check(isinstance(table, dict), where, f"expected a table, got {_toml(table)}")
    known = set(cls.__dataclass_fields__) - {"path"} if cls is Recipe else set(cls.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    hints = get_type_hints(cls)
    values = {}
    for key, value in table.items():
        hint = hints[key]
        if type(None) in get_args(hint):  # X | None: TOML has no null, so a value given is an X
            (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
        if hint == list[str] and isinstance(value, str):
            value = [value]
        if not _fits(value, hint):
            raise RecipeError(f"{where}: {key}: expected {_EXPECTED[hint]}, got {_toml(value)}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        raise RecipeError(f"{where}: {exc}") from None


def _toml(value) -> str:
    """A recipe value as TOML would spell it (strings in double quotes), for error messages."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _check_positive(spec, keys: tuple[str, ...], where: str) -> None:
    """Sizes and counts, when given, must be above zero."""
    for key in keys:
        value = getattr(spec, key)
        _check(value is None or value > 0, where, f"{key} must be > 0, got {value}")


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{where}: {message}")


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; paths become absolute (relative to the recipe's real location)."""
    from .cleaners import KINDS
    from .readers import FORMATS

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None
    base = path.resolve().parent
    where = str(path)
    data = dict(data)
    data.setdefault("name", path.stem)
    sources = data.pop("sources", None)
    _check(isinstance(sources, list) and sources and all(isinstance(t, dict) for t in sources), where,
           "needs at least one [[sources]] table")
    tokenizer = _build(TokenizerSpec, data.pop("tokenizer", {}), f"{where} [tokenizer]")
    dedup = _build(DedupSpec, data.pop("dedup", {}), f"{where} [dedup]")
    specs = []
    for i, table in enumerate(sources):
        swhere = f"{where} [[sources]] #{i + 1} ({table.get('name', '?')})"
        _check("name" in table and "paths" in table and "format" in table, swhere, "needs name, paths and format")
        spec = _build(SourceSpec, table, swhere)
        _check(bool(spec.paths), swhere, "paths is empty; give file names or globs")
        _check(spec.format in FORMATS, swhere, f"format must be one of {', '.join(FORMATS)}, got {spec.format!r}")
        _check(spec.cleaner in KINDS, swhere, f"cleaner must be one of {', '.join(KINDS)}, got {spec.cleaner!r}")
        spec.paths = [os.path.normpath(base / os.path.expanduser(p)) for p in spec.paths]
        _check(spec.split in ("hash", "tail"), swhere, f"split must be 'hash' or 'tail', got {spec.split!r}")
        _check((spec.proportion is None) != (spec.epochs is None), swhere, "give exactly one of proportion, epochs")
        _check((spec.proportion or 0) >= 0 and (spec.epochs or 0) >= 0, swhere, "proportion/epochs must be >= 0")
        _check(spec.val_fraction is None or 0 <= spec.val_fraction < 1, swhere, "val_fraction must be in [0, 1)")
        specs.append(spec)
    names = [s.name for s in specs]
    _check(len(set(names)) == len(names), where, f"source names must be unique, got {names}")
    recipe = _build(Recipe, {**data, "sources": specs, "tokenizer": tokenizer, "dedup": dedup}, where)
    recipe.path = str(path)
    _check(0 <= recipe.validation_fraction < 1, where, "validation_fraction must be in [0, 1)")
    _check(recipe.seed >= 0, where, f"seed must be >= 0, got {recipe.seed}")
    _check_positive(recipe, ("token_budget",), where)
    _check_positive(tokenizer, ("vocab_size", "sample_chars", "max_sentences"), f"{where} [tokenizer]")
    _check_positive(dedup, ("num_perm", "ngram"), f"{where} [dedup]")
    _check(0 <= dedup.near_threshold <= 1, f"{where} [dedup]", "near_threshold must be in [0, 1] (0 disables)")
    _check((tokenizer.path is None) != (tokenizer.vocab_size is None), f"{where} [tokenizer]",
           "give either path (an existing SentencePiece model) or vocab_size (train one)")
    if tokenizer.path is not None:
        tokenizer.path = os.path.normpath(base / os.path.expanduser(tokenizer.path))
    if recipe.output is not None:
        recipe.output = os.path.normpath(base / os.path.expanduser(recipe.output))
    _check(all(s.epochs is None for s in specs) or recipe.token_budget, where,
           "a source with epochs needs token_budget")
    return recipe


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the recipe, the pipeline version and the inputs' names, sizes and modification times."""
    from .readers import expand_paths

    h = hashlib.sha256()
    settings = asdict(recipe)
    settings.pop("path")
    settings.pop("output")
    h.update(json.dumps({"pipeline": PIPELINE_VERSION, "recipe": settings}, sort_keys=True).encode())
    inputs = [p for s in recipe.sources for p in expand_paths(s.paths)]
    if recipe.tokenizer.path:
        inputs.append(Path(recipe.tokenizer.path))
    for p in inputs:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- pipeline


class SourceStats:
    """What one source's documents went through in stage 1."""

    def __init__(self):
        self.read = 0
        self.kept = 0
        self.dropped: Counter[str] = Counter()
        self.lines_removed = 0
        self.bad = 0
        self.first_bad: list[dict] = []
        self.chars_read = 0

    def on_error(self, location: str, reason: str) -> None:
        self.bad += 1
        if len(self.first_bad) < MAX_BAD_RECORDS_LISTED:
            self.first_bad.append({"location": location, "reason": reason})
            log.warning("skipping bad record %s: %s", location, reason)


def _is_validation(text: str, fraction: float) -> bool:
    """Deterministic split: the document's text hash, as a fraction of 2**64, below ``fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


class _Spill:
    """Cleaned documents of one source and split, kept on disk as JSON lines until the tokenizer is trained."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "w", encoding="utf-8")
        self.chars = 0

    def add(self, text: str) -> None:
        self.file.write(json.dumps(text, ensure_ascii=False) + "\n")
        self.chars += len(text)

    def texts(self):
        self.file.close()
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def clean_documents(recipe: Recipe, stats: dict, *, strict: bool = False):
    """Stage 1, in this process: read, clean and deduplicate every source in recipe order.

    Yields ``(source spec, document, cleaned text)`` for each document kept and fills ``stats[name]`` (a
    ``SourceStats``) with what was read and dropped. Exact and near dedup are global (a document seen in an
    earlier source is a duplicate), line dedup is per source."""
    from .cleaners import get_cleaner
    from .dedup import ExactDedup, LineDedup, NearDedup
    from .readers import read_documents

    d = recipe.dedup
    exact = ExactDedup() if d.exact else None
    near = NearDedup(threshold=d.near_threshold, num_perm=d.num_perm, ngram=d.ngram) if d.near_threshold else None
    for spec in recipe.sources:
        st = stats[spec.name] = SourceStats()
        clean = get_cleaner(spec.cleaner, **spec.cleaner_options)
        lines = LineDedup() if (d.line if spec.line_dedup is None else spec.line_dedup) else None
        use_near = near is not None and (spec.near_dedup is None or spec.near_dedup)
        docs = read_documents(spec.paths, spec.format, source=spec.name, text_field=spec.text_field,
                              strict=strict, on_error=st.on_error, paragraphs=spec.paragraphs)
        for doc in docs:
            st.read += 1
            st.chars_read += len(doc.text)
            result = clean(doc)
            if result.text is None:
                st.dropped[f"filter:{result.reason}"] += 1
                continue
            text = result.text
            if exact is not None and exact.is_duplicate(text):
                st.dropped["exact_duplicate"] += 1
                continue
            if lines is not None:
                before = text.count("\n") + 1
                text = lines.filter(text)
                st.lines_removed += before - (text.count("\n") + 1 if text else 0)
                if not text.strip():
                    st.dropped["line_duplicates"] += 1
                    continue
            if use_near and near.is_duplicate(f"{spec.name}/{st.read}", text):
                st.dropped["near_duplicate"] += 1
                continue
            st.kept += 1
            yield spec, doc, text
        if st.read == 0:
            first = st.first_bad[0] if st.bad else None
            bad = f"; {st.bad} bad, the first: {first['location']}: {first['reason']}" if first else ""
            raise ValueError(f"source {spec.name!r}: no documents in {spec.paths} (format {spec.format!r}){bad}")
        if st.kept == 0:
            raise ValueError(f"source {spec.name!r}: none of its {st.read} documents survived cleaning and "
                             f"deduplication (dropped: {dict(st.dropped)}, bad records: {st.bad})")
        log.info("%s: read %d documents, kept %d, dropped %s, %d bad records",
                 spec.name, st.read, st.kept, dict(st.dropped), st.bad)


def _split_documents(recipe: Recipe, stats: dict, strict: bool):
    """``(source, split, text)`` for every kept document: split by text hash, or by position (``tail``)."""
    for spec, _, text in clean_documents(recipe, stats, strict=strict):
        val_fraction = recipe.validation_fraction if spec.val_fraction is None else spec.val_fraction
        if spec.split == "tail":
            cut = round(len(text) * (1 - val_fraction))
            yield spec.name, "train", text[:cut]
            if cut < len(text):
                yield spec.name, "validation", text[cut:]
        else:
            yield spec.name, "validation" if _is_validation(text, val_fraction) else "train", text


def _spill(documents, work: Path) -> dict:
    """Write documents to per-source-and-split spill files (to train the tokenizer before tokenizing)."""
    spills: dict[tuple[str, str], _Spill] = {}
    for name, split, text in documents:
        if (name, split) not in spills:
            spills[(name, split)] = _Spill(work / f"{name}.{split}.jsonl")
        spills[(name, split)].add(text)
    return spills


def _spilled(spills: dict):
    for (name, split), spill in spills.items():
        for text in spill.texts():
            yield name, split, text


def _tokenizer_sample(recipe: Recipe, spills: dict):
    """Train-split text for the tokenizer: each source gives its proportion of ``sample_chars`` (a source
    given by epochs an equal share), at least 1%, picked evenly through the source by a seeded generator."""
    given = sum(s.proportion for s in recipe.sources if s.proportion is not None) or 1.0
    rng = np.random.default_rng(recipe.seed)
    for spec in recipe.sources:
        share = spec.proportion / given if spec.proportion is not None else 1 / len(recipe.sources)
        spill = spills.get((spec.name, "train"))
        if spill is None:
            continue
        keep = max(share, 0.01) * recipe.tokenizer.sample_chars / max(spill.chars, 1)
        for text in spill.texts():
            if keep >= 1.0 or rng.random() < keep:
                yield text


_worker_tokenizer = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    from ..tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(document lengths, all tokens) of a chunk: BOS + text + EOS per document."""
    docs = [_worker_tokenizer.encode(t, bos=True, eos=True) for t in texts]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    return lengths, np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])


def _chunks(documents, text_bytes: Counter):
    """Group ``(source, split, text)`` into per-source-and-split chunks of about ``CHUNK_CHARS`` characters,
    counting the UTF-8 bytes of each source and split in ``text_bytes``."""
    buffers: dict[tuple[str, str], list] = {}
    for name, split, text in documents:
        key = (name, split)
        text_bytes[key] += len(text.encode("utf-8"))
        buf = buffers.setdefault(key, [[], 0])
        buf[0].append(text)
        buf[1] += len(text)
        if buf[1] >= CHUNK_CHARS:
            yield key, buf[0]
            buffers[key] = [[], 0]
    for key, (chunk, _) in buffers.items():
        if chunk:
            yield key, chunk


def _tokenize(documents, tokenizer_path: Path, out: Path, vocab_size: int, workers: int) -> dict:
    """Encode ``(source, split, text)`` documents in ``workers`` processes while they arrive and write the
    shards in input order; a bounded number of chunks is in flight, so memory stays constant."""
    dtype = token_dtype(vocab_size)
    writers: dict[tuple[str, str], ShardWriter] = {}
    text_bytes: Counter = Counter()

    def write(key, lengths, tokens):
        if key not in writers:
            writers[key] = ShardWriter(out / key[1] / key[0], dtype)
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            writers[key].add(doc)

    if workers <= 1:
        _init_worker(str(tokenizer_path))
        for key, chunk in _chunks(documents, text_bytes):
            write(key, *_encode_chunk(chunk))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            inflight: deque = deque()
            for key, chunk in _chunks(documents, text_bytes):
                inflight.append((key, pool.apply_async(_encode_chunk, (chunk,))))
                if len(inflight) > 2 * workers:
                    key, result = inflight.popleft()
                    write(key, *result.get())
            while inflight:
                key, result = inflight.popleft()
                write(key, *result.get())
    return {key: split_entry(w, text_bytes[key]) for key, w in writers.items()}


def _proportions(recipe: Recipe, train_tokens: dict[str, int], budget: int) -> dict[str, float]:
    """Sampling proportions: sources given by epochs take ``epochs * tokens / budget``, the rest share what is
    left by their given proportions."""
    fixed = {s.name: s.epochs * train_tokens[s.name] / budget for s in recipe.sources if s.epochs is not None}
    left = 1.0 - sum(fixed.values())
    if left < -1e-9:
        raise RecipeError(f"{recipe.path}: the epochs asked for need {1 - left:.2f}x token_budget={budget}")
    given = {s.name: s.proportion for s in recipe.sources if s.proportion is not None}
    total = sum(given.values())
    if given and total <= 0:
        raise RecipeError(f"{recipe.path}: every proportion is 0")
    return {**fixed, **{n: p / total * left for n, p in given.items()}}


def _build_prepared(recipe: Recipe, digest: str, out: Path, strict: bool, workers: int) -> None:
    from ..tokenizer import Tokenizer

    started = time.perf_counter()
    timing = {}
    stats: dict[str, SourceStats] = {}
    documents = _split_documents(recipe, stats, strict)
    tok_path = out / TOKENIZER_NAME
    if recipe.tokenizer.path:
        # The tokenizer is known: documents stream from reading and dedup (this process) straight into the
        # tokenizer workers, so the two stages overlap.
        shutil.copyfile(recipe.tokenizer.path, tok_path)
        tok_info = {"source": recipe.tokenizer.path}
        tokenizer = Tokenizer(tok_path)
        entries = _tokenize(documents, tok_path, out, tokenizer.vocab_size, workers)
        timing["read_clean_dedup_tokenize_s"] = time.perf_counter() - started
    else:
        from ..tokenizer import train_tokenizer

        work = out / ".work"
        work.mkdir()
        spills = _spill(documents, work)
        timing["read_clean_dedup_s"] = time.perf_counter() - started
        t = time.perf_counter()
        kwargs = {"max_sentences": recipe.tokenizer.max_sentences} if recipe.tokenizer.max_sentences else {}
        trained = train_tokenizer(_tokenizer_sample(recipe, spills), recipe.tokenizer.vocab_size, work / "tokenizer",
                                  seed=recipe.seed, **kwargs)
        shutil.copyfile(trained, tok_path)
        tok_info = {"source": "trained on the train split", "sample_chars": recipe.tokenizer.sample_chars}
        tokenizer = Tokenizer(tok_path)
        timing["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        entries = _tokenize(_spilled(spills), tok_path, out, tokenizer.vocab_size, workers)
        timing["tokenize_s"] = time.perf_counter() - t
        shutil.rmtree(work)
    tok_info.update(vocab_size=tokenizer.vocab_size, **tokenizer.special_ids(),
                    sha256=hashlib.sha256(tok_path.read_bytes()).hexdigest())
    for spec in recipe.sources:
        if (spec.name, "train") not in entries:
            raise ValueError(f"source {spec.name!r}: every kept document went to the validation split; "
                             "lower validation_fraction")

    train_tokens = {s.name: entries[(s.name, "train")]["tokens"] for s in recipe.sources}
    budget = int(recipe.token_budget or sum(train_tokens.values()))
    proportions = _proportions(recipe, train_tokens, budget)
    sources = {}
    for spec in recipe.sources:
        st = stats[spec.name]
        sources[spec.name] = {
            "proportion": proportions[spec.name],
            "epochs": proportions[spec.name] * budget / train_tokens[spec.name],
            "format": spec.format, "cleaner": spec.cleaner, "paths": spec.paths,
            "documents_read": st.read, "documents_kept": st.kept, "chars_read": st.chars_read,
            "dropped": dict(sorted(st.dropped.items())), "lines_removed_by_line_dedup": st.lines_removed,
            "bad_records": st.bad, "first_bad_records": st.first_bad,
            "splits": {split: entries[(spec.name, split)] for split in ("train", "validation")
                       if (spec.name, split) in entries},
        }
    timing["total_s"] = time.perf_counter() - started
    finish_prepared(out, {
        "name": recipe.name, "recipe_path": recipe.path, "recipe_hash": digest, "recipe": asdict(recipe),
        "dtype": token_dtype(tokenizer.vocab_size).str, "vocab_size": tokenizer.vocab_size, "tokenizer": tok_info,
        "token_budget": budget, "sources": sources,
        "totals": {
            "documents_read": sum(s["documents_read"] for s in sources.values()),
            "train_tokens": sum(train_tokens.values()),
            "validation_tokens": sum(e["tokens"] for (n, s), e in entries.items() if s == "validation"),
            "bytes_kept": sum(e["bytes"] for e in entries.values()),
        },
        "workers": workers, "timing": {k: round(v, 3) for k, v in timing.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def is_prepared(folder: str | Path, digest: str | None = None) -> bool:
    """A complete prepared folder (for this recipe hash, when given)."""
    folder = Path(folder)
    if not (folder / COMPLETE_NAME).is_file():
        return False
    if digest is None:
        return True
    try:
        return json.loads((folder / MANIFEST_NAME).read_text()).get("recipe_hash") == digest
    except (OSError, json.JSONDecodeError):
        return False


PREPARED_FILES = (MANIFEST_NAME, COMPLETE_NAME, TOKENIZER_NAME, "train", "validation")  # what a build writes


def output_dir(recipe: Recipe) -> Path:
    return Path(recipe.output) if recipe.output else cache_dir() / "data" / recipe.name


def prepare(recipe_path: str | Path | None = None, output: str | Path | None = None, *, strict: bool = False,
            workers: int = 2, force: bool = False) -> Path:
    """Prepare the data a recipe describes (None: the built-in corpus) and return the prepared folder.

    Returns at once when the folder is already complete for the same recipe and inputs (unless ``force``)."""
    from ..fs import atomic_write_dir, check_output_folder, folder_bytes

    if recipe_path is None:
        recipe = load_recipe(default_recipe_path())
        out = Path(output) if output else default_prepared_dir()
    else:
        recipe = load_recipe(recipe_path)
        out = Path(output) if output else output_dir(recipe)
    digest = recipe_hash(recipe)
    check_output_folder(out, PREPARED_FILES, "prepared data folder",
                        hint="choose another --output (a prepared folder is replaced whole when rebuilt)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # One builder per folder: a second process (another rank, a second terminal) waits, then finds it ready.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_prepared(out, digest):
            log.info("%s is up to date for %s", out, recipe.path)
            return out
        log.info("preparing %s into %s with %d workers", recipe.path, out, workers)
        atomic_write_dir(out, lambda tmp: _build_prepared(recipe, digest, Path(tmp), strict, workers),
                         owned=PREPARED_FILES, what="prepared data folder",
                         size_hint=folder_bytes(out) if out.is_dir() else None)
    return out


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a complete prepared folder."""
    from .shards import PreparedData

    return PreparedData(folder).manifest
