"""Bad inputs through the real commands: a cut-short compressed or Parquet file is one bad record naming the
file (an error with --strict), and a recipe value of the wrong type is an error naming its key."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_prepare import WORDS, documents, source, write_jsonl, write_recipe

from llamalab.cli import main as cli
from llamalab.data.prepare import load_manifest
from llamalab.data.readers import BadRecord, read_documents
from llamalab.tokenizer import train_tokenizer

COMPRESS = {"zst": zstandard.ZstdCompressor().compress, "gz": gzip.compress, "bz2": bz2.compress,
            "xz": lzma.compress}
KIND = {"zst": "zstd", "gz": "gzip", "bz2": "bz2", "xz": "xz"}


def write_records(path, texts, keep=1.0):
    """``texts`` as JSONL compressed by the suffix, or as Parquet; cut to ``keep`` of its bytes."""
    if path.suffix == ".parquet":
        pq.write_table(pa.table({"text": texts}), path)
        data = path.read_bytes()
    else:
        data = COMPRESS[path.suffix[1:]]("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def fmt(path) -> str:
    return "parquet" if path.suffix == ".parquet" else "jsonl"


def collect(path):
    errors = []
    docs = list(read_documents([str(path)], fmt(path), source="s",
                               on_error=lambda location, reason: errors.append((location, reason))))
    return [d.text for d in docs], errors


@pytest.mark.parametrize("suffix", ["zst", "gz", "bz2", "xz"])
def test_cut_compressed_file_keeps_what_came_before_and_is_one_bad_record(tmp_path, suffix):
    # several zstd blocks (128 KiB) and xz/gzip buffers, so the cut falls after some complete documents
    texts = [f"{i} " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(40)) for i in range(3000)]
    path = write_records(tmp_path / f"cut.jsonl.{suffix}", texts, keep=0.6)
    read, errors = collect(path)
    assert read == texts[: len(read)] and len(read) < len(texts)  # a prefix, the last partial record dropped
    assert len(errors) == 1  # the cut, once: never "malformed JSON" for the record it went through
    (location, reason), = errors
    assert location == str(path) and reason.startswith(f"truncated or corrupt {KIND[suffix]} stream after")
    assert "it is incomplete" in reason
    with pytest.raises(BadRecord, match=rf"cut.jsonl.{suffix}: truncated or corrupt {KIND[suffix]} stream"):
        list(read_documents([str(path)], "jsonl", source="s", strict=True))


def test_zstd_files_of_several_frames_read_whole(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n") for t in "abc"]
    (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(frames))
    assert collect(tmp_path / "frames.jsonl.zst") == (["a", "b", "c"], [])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tokenizer trained once, so the prepare runs below only read and tokenize."""
    return train_tokenizer(documents(1, 100), 400, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("suffix", ["jsonl.zst", "jsonl.gz", "jsonl.bz2", "jsonl.xz", "parquet"])
def test_prepare_counts_a_cut_file_as_bad_or_stops_with_strict(tmp_path, capsys, tokenizer, suffix):
    good = write_records(tmp_path / f"good.{suffix}", documents(2, 20))
    cut = write_records(tmp_path / f"cut.{suffix}", documents(3, 40), keep=0.6)
    recipe = write_recipe(tmp_path, source("alpha", [good.name, cut.name], fmt(cut), proportion=1),
                          tokenizer=f'path = "{tokenizer}"')
    args = ["data", "prepare", str(recipe), "--workers", "1", "-q"]

    assert cli([*args, "--output", str(tmp_path / "strict"), "--strict"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"llamalab data prepare: error: {cut}: ")
    assert "truncated" in err and not (tmp_path / "strict").exists()

    assert cli([*args, "--output", str(tmp_path / "out")]) == 0
    alpha = load_manifest(tmp_path / "out")["sources"]["alpha"]
    assert alpha["bad_records"] == 1 and alpha["documents_read"] >= 20
    (record,) = alpha["first_bad_records"]
    assert record["location"] == str(cut) and "truncated" in record["reason"]


def test_tokenizer_train_skips_a_cut_file_and_names_it(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", documents(4, 100))
    cut = write_records(tmp_path / "cut.jsonl.gz", documents(5, 40), keep=0.6)
    rc = cli(["tokenizer", "train", "--input", f"jsonl:{good}", str(cut), "--vocab-size", "400",
              "--output", str(tmp_path / "tok")])
    err = capsys.readouterr().err
    assert rc == 0 and f"skipped bad record {cut}: truncated or corrupt gzip stream" in err
    assert (tmp_path / "tok" / "tokenizer.model").is_file()


@pytest.mark.parametrize("edit, message", [
    (("validation_fraction = 0.2", 'validation_fraction = "ten percent"'),
     r'recipe.toml: validation_fraction: expected a number, got "ten percent"'),
    (("exact = true", 'exact = true\nnear_threshold = "high"'),
     r'recipe.toml \[dedup\]: near_threshold: expected a number, got "high"'),
    (("validation_fraction = 0.2", 'validation_fraction = 0.2\nseed = "abc"'),
     r'recipe.toml: seed: expected an integer, got "abc"'),
    (("vocab_size = 400", 'vocab_size = "big"'),
     r'recipe.toml \[tokenizer\]: vocab_size: expected an integer, got "big"'),
    (("proportion = 1", "proportion = true"), r"#1 \(alpha\): proportion: expected a number, got true"),
    (('paths = ["a.jsonl"]', "paths = 3"), r"#1 \(alpha\): paths: expected a string or a list of strings, got 3"),
    (("exact = true", "exact = 1"), r"recipe.toml \[dedup\]: exact: expected true or false, got 1"),
], ids=["validation_fraction", "near_threshold", "seed", "vocab_size", "proportion", "paths", "exact"])
def test_recipe_value_of_the_wrong_type_names_the_key(tmp_path, capsys, edit, message):
    write_jsonl(tmp_path / "a.jsonl", documents(6, 10))
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
    recipe.write_text(recipe.read_text().replace(*edit))
    assert cli(["data", "prepare", str(recipe), "--output", str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llamalab data prepare: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
