"""`llamalab data prepare`: recipes in, shards that decode to sentencepiece's own ids out, with a manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from llamalab.cli import main as cli
from llamalab.data import prepare as prep
from llamalab.data.loader import MixtureLoader, ValidationSet
from llamalab.data.prepare import RecipeError, load_manifest, prepare
from llamalab.data.shards import PreparedData
from llamalab.tokenizer import Tokenizer

WORDS = ("the a of to and in river stone light house garden quiet north winter letter count ship "
         "price seven 1789 market window said walked because however silver field").split()


def sentences(rng, n):
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))).capitalize() + "." for _ in range(n)]


def documents(seed, n):
    rng = np.random.default_rng(seed)
    return ["\n".join(sentences(rng, int(rng.integers(1, 6)))) for _ in range(n)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_recipe(folder, body, tokenizer='vocab_size = 400\nsample_chars = 100000'):
    path = folder / "recipe.toml"
    path.write_text(f"validation_fraction = 0.2\n[tokenizer]\n{tokenizer}\n[dedup]\nexact = true\n{body}")
    return path


def source(name, paths, fmt="jsonl", **extra):
    lines = [f'[[sources]]\nname = "{name}"\npaths = {json.dumps(paths)}\nformat = "{fmt}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two jsonl sources, a tokenizer trained by the pipeline, 2 workers."""
    folder = tmp_path_factory.mktemp("prep")
    a = documents(1, 120)
    b = documents(2, 60)
    b[5] = a[3]  # a planted cross-source exact duplicate
    write_jsonl(folder / "a.jsonl", a)
    write_jsonl(folder / "b.jsonl", b, field="body")
    recipe = write_recipe(folder, source("alpha", ["a.jsonl"], proportion=3)
                          + source("beta", ["b.jsonl"], text_field="body", proportion=1))
    out = prepare(recipe, folder / "out", workers=2)
    return folder, out, a, b


def test_shards_decode_to_sentencepiece_ids_of_each_document(prepared):
    folder, out, a, b = prepared
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    data = PreparedData(out)
    assert data.dtype == np.uint16 and sp.vocab_size() == 400
    for name, texts in (("alpha", a), ("beta", [t for i, t in enumerate(b) if i != 5])):
        got = {split: [d.tolist() for d in data.stream(name, split).documents()] for split in ("train", "validation")}
        want = [[sp.bos_id(), *sp.encode(t), sp.eos_id()] for t in texts]
        assert len(got["validation"]) > 0
        # every document lands in exactly one split, in input order within it
        for split_docs in got.values():
            positions = [want.index(d) for d in split_docs]
            assert positions == sorted(positions)
        assert sorted(got["train"] + got["validation"]) == sorted(want)
        assert sum(map(len, want)) == sum(data.split_info(name, s)["tokens"] for s in got)


def test_manifest_counts_and_epochs(prepared):
    _, out, a, b = prepared
    m = load_manifest(out)
    alpha, beta = m["sources"]["alpha"], m["sources"]["beta"]
    assert alpha["documents_read"] == 120 and beta["documents_read"] == 60
    assert beta["dropped"] == {"exact_duplicate": 1} and alpha["dropped"] == {}
    assert alpha["proportion"] == pytest.approx(0.75) and beta["proportion"] == pytest.approx(0.25)
    tokens = alpha["splits"]["train"]["tokens"]
    assert alpha["epochs"] == pytest.approx(0.75 * m["token_budget"] / tokens)
    kept_bytes = sum(len(t.encode()) for t in a)
    assert sum(s["bytes"] for s in alpha["splits"].values()) == kept_bytes
    assert m["vocab_size"] == 400 and m["tokenizer"]["bos_id"] == 1 and m["tokenizer"]["eos_id"] == 2


def test_worker_count_does_not_change_the_shards(prepared, tmp_path):
    folder, out, _, _ = prepared
    tok = out / "tokenizer.model"
    recipe = write_recipe(folder, source("alpha", ["a.jsonl"], proportion=3)
                          + source("beta", ["b.jsonl"], text_field="body", proportion=1),
                          tokenizer=f'path = "{tok}"')
    one = prepare(recipe, tmp_path / "one", workers=1)
    for f in sorted(out.rglob("*.tokens")) + sorted(out.rglob("*.offsets.npy")):
        assert f.read_bytes() == (one / f.relative_to(out)).read_bytes(), f


def test_loaders_read_the_prepared_folder(prepared):
    _, out, _, _ = prepared
    batch = next(MixtureLoader(out, batch_size=2, seq_len=16))
    assert batch.shape == (2, 17) and int(batch.max()) < 400
    val = ValidationSet(out, seq_len=16, batch_size=4)
    assert len(val) > 0 and 2.0 < val.bytes_per_token < 6.0


def test_up_to_date_folder_is_reused_and_changes_rebuild(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", documents(3, 40))
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
    out = prepare(recipe, tmp_path / "out", workers=1)
    created = load_manifest(out)["created"]
    stamp = (out / "COMPLETE").stat().st_mtime_ns
    assert prepare(recipe, tmp_path / "out", workers=1) == out
    assert (out / "COMPLETE").stat().st_mtime_ns == stamp  # nothing rebuilt

    def boom(*args, **kwargs):
        raise RuntimeError("worker died")

    (tmp_path / ".out.tmp-killed" / "train").mkdir(parents=True)  # what a killed build leaves behind
    write_jsonl(tmp_path / "a.jsonl", documents(4, 50))  # inputs changed: a rebuild is due ...
    monkeypatch.setattr(prep, "_tokenize", boom)
    with pytest.raises(RuntimeError, match="worker died"):
        prepare(recipe, tmp_path / "out", workers=1)
    # ... which failed: the old complete folder is untouched and nothing half-written is left beside it
    assert load_manifest(out)["created"] == created and (out / "COMPLETE").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == ["a.jsonl", "out", "recipe.toml"]
    monkeypatch.undo()
    prepare(recipe, tmp_path / "out", workers=1)
    assert load_manifest(out)["sources"]["alpha"]["documents_read"] == 50


def test_bad_records_are_counted_or_fatal_with_strict(tmp_path, capsys):
    good = documents(5, 30)
    lines = [json.dumps({"text": t}) for t in good]
    lines[2] = '{"text": "unterminated'
    lines[6] = json.dumps({"title": "no text field"})
    raw = "\n".join(lines).encode() + b"\n"
    raw = raw.replace(json.dumps({"text": good[4]}).encode(), b'{"text": "bad \xff byte"}')
    (tmp_path / "a.jsonl").write_bytes(raw)
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
    out = prepare(recipe, tmp_path / "out", workers=1)
    alpha = load_manifest(out)["sources"]["alpha"]
    assert alpha["bad_records"] == 3 and alpha["documents_read"] == 27
    where = [r["location"] for r in alpha["first_bad_records"]]
    assert where == [f"{tmp_path / 'a.jsonl'}:{n}" for n in (3, 5, 7)]

    rc = cli(["data", "prepare", str(recipe), "--output", str(tmp_path / "strict"), "--strict", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "a.jsonl:3" in err and not (tmp_path / "strict").exists()


def test_missing_inputs_and_empty_sources_are_errors(tmp_path, capsys):
    recipe = write_recipe(tmp_path, source("alpha", ["nope/*.jsonl"], proportion=1))
    assert cli(["data", "prepare", str(recipe), "--output", str(tmp_path / "o")]) == 1
    assert "nope/*.jsonl" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    recipe = write_recipe(tmp_path, source("alpha", ["empty.jsonl"], proportion=1))
    with pytest.raises(ValueError, match="alpha.*no documents"):
        prepare(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_recipe_errors_name_file_and_key(tmp_path):
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1, fromat="jsonl"))
    with pytest.raises(RecipeError, match=r"recipe.toml \[\[sources\]\] #1 \(alpha\).*fromat"):
        prepare(recipe)
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"]))
    with pytest.raises(RecipeError, match="exactly one of proportion, epochs"):
        prepare(recipe)
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1, cleaner="wiki"))
    with pytest.raises(RecipeError, match=r"#1 \(alpha\): cleaner must be one of .*wikipedia.*got 'wiki'"):
        prepare(recipe)


def test_epochs_fix_a_sources_share_of_the_token_budget(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", documents(6, 40))
    write_jsonl(tmp_path / "b.jsonl", documents(7, 40))
    write_jsonl(tmp_path / "c.jsonl", documents(8, 40))
    body = (source("a", ["a.jsonl"], epochs=2.0) + source("b", ["b.jsonl"], proportion=1)
            + source("c", ["c.jsonl"], proportion=3))
    recipe = write_recipe(tmp_path, "", tokenizer='vocab_size = 400\nsample_chars = 100000')
    recipe.write_text("token_budget = 20000\n" + recipe.read_text() + body)
    m = load_manifest(prepare(recipe, tmp_path / "out", workers=1))
    a, b, c = (m["sources"][n] for n in "abc")
    assert a["epochs"] == pytest.approx(2.0)
    assert a["proportion"] == pytest.approx(2.0 * a["splits"]["train"]["tokens"] / 20000)
    assert c["proportion"] == pytest.approx(3 * b["proportion"])
    assert a["proportion"] + b["proportion"] + c["proportion"] == pytest.approx(1.0)


def test_split_by_text_hash_is_stable_when_documents_are_added(tmp_path):
    docs = documents(9, 80)
    val = {}
    for n in (50, 80):
        write_jsonl(tmp_path / "a.jsonl", docs[:n])
        recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
        out = prepare(recipe, tmp_path / f"out{n}", workers=1)
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))  # retrained: compare text
        val[n] = {sp.decode(d[1:-1].tolist()) for d in PreparedData(out).stream("alpha", "validation").documents()}
    assert val[50] and val[50] <= val[80] and len(val[80]) > len(val[50])


@pytest.mark.slow
def test_shakespeare_recipe_holds_out_the_last_tenth_by_characters(shared, tmp_path):
    text_path = shared("corpus", "tinyshakespeare.txt")
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "data", "shakespeare.toml")
    out = prepare(recipe, tmp_path / "shakespeare", workers=2)
    text = text_path.read_text().rstrip("\n")  # the `none` cleaner trims trailing newlines
    cut = round(len(text) * 0.9)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    data = PreparedData(out)
    (train,) = list(data.stream("shakespeare", "train").documents())
    (val,) = list(data.stream("shakespeare", "validation").documents())
    assert sp.decode(train[1:-1].tolist()) == text[:cut]
    assert sp.decode(val[1:-1].tolist()) == text[cut:]
    assert load_manifest(out)["vocab_size"] == 1024


def test_builtin_corpus_ships_its_licenses_and_provenance():
    import zstandard

    from llamalab.data.prepare import default_recipe_path, load_recipe

    recipe = load_recipe(default_recipe_path())
    folder = default_recipe_path().parent
    notice = (folder / "NOTICE.md").read_text()
    for name in ("LICENSE.CC-BY-SA-4.0.txt", "LICENSE.CC-BY-SA-3.0.txt", "LICENSE.CPython.PSF.txt"):
        assert (folder / name).stat().st_size > 10_000 and name in notice
    assert [s.name for s in recipe.sources] == ["books", "wikipedia", "code", "stackexchange"]
    assert recipe.tokenizer.vocab_size == 4096  # the demo preset's vocabulary
    for spec in recipe.sources:
        with zstandard.open(spec.paths[0], "rt", encoding="utf-8") as f:
            first = json.loads(f.readline())
        assert first["text"] and first["id"]
        if spec.name in ("wikipedia", "stackexchange"):  # CC BY-SA: every record links its original
            assert first["url"].startswith("https://")


@pytest.mark.slow
def test_prepare_without_recipe_builds_the_builtin_corpus_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMALAB_CACHE", str(tmp_path))
    out = prepare(None)
    assert out == tmp_path / "data" / "default"
    m = load_manifest(out)
    assert m["vocab_size"] == 4096 and m["dtype"] == "<u2"
    for name, s in m["sources"].items():
        assert s["splits"]["train"]["tokens"] > 100_000 and s["splits"]["validation"]["tokens"] > 0, name
    # Table 1 style: books and Wikipedia about two epochs, code and Q&A about one, within the token budget
    assert all(1.7 < m["sources"][n]["epochs"] < 2.4 for n in ("books", "wikipedia"))
    assert all(0.8 < m["sources"][n]["epochs"] < 1.3 for n in ("code", "stackexchange"))
    stamp = (out / "COMPLETE").stat().st_mtime_ns
    assert prepare(None) == out and (out / "COMPLETE").stat().st_mtime_ns == stamp
    batch = next(MixtureLoader(out, batch_size=4, seq_len=256))
    text = Tokenizer(out / "tokenizer.model").decode(batch[0].tolist())
    assert len(text) > 400  # ~4 characters per token with a 4096-piece BPE on English


def test_concurrent_prepares_build_once(tmp_path, monkeypatch):
    import threading

    write_jsonl(tmp_path / "a.jsonl", documents(10, 30))
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
    builds = []
    real = prep._build_prepared

    def counted(*args):
        builds.append(1)
        return real(*args)

    monkeypatch.setattr(prep, "_build_prepared", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare(recipe, tmp_path / "out", workers=1)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "out"] * 2 and len(builds) == 1
    assert load_manifest(tmp_path / "out")["sources"]["alpha"]["documents_read"] == 30


def test_a_folder_that_is_not_prepared_data_is_never_replaced(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", documents(3, 40))
    recipe = write_recipe(tmp_path, source("alpha", ["a.jsonl"], proportion=1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli(["data", "prepare", str(recipe), "--output", str(mine), "--workers", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llamalab data prepare: error:")
    assert "not a llamalab prepared data folder" in err and "notes.txt" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    # a prepared folder is ours: rebuilding replaces it whole, and the new folder follows the umask
    out = prepare(recipe, tmp_path / "out", workers=1)
    assert prepare(recipe, out, workers=1, force=True) == out
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
