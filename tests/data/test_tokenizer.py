"""Tokenizer: Meta's model against llama.cpp and llama2.c vectors; training with LLaMA's settings."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from llamalab.cli import main as cli
from llamalab.data.readers import read_documents
from llamalab.tokenizer import Tokenizer, sample_sources, train_tokenizer

# Any Unicode text except lone surrogates (not encodable) and U+2581, SentencePiece's own space marker.
UNICODE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                       max_size=200)


@pytest.fixture(scope="module")
def meta():
    from shared_data import shared_path

    return Tokenizer(shared_path("tokenizers", "llama", "tokenizer.model"))


def test_meta_tokenizer_matches_llama_cpp_vectors(meta, shared):
    folder = shared("tokenizers", "llama")
    inputs = (folder / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert inputs[-1] == "" and outputs[-1] == ""  # every case ends with the separator / a newline
    inputs, outputs = inputs[:-1], outputs[:-1]
    assert len(inputs) == len(outputs) == 46
    for text, expected in zip(inputs, outputs):
        assert meta.encode(text, bos=False) == [int(i) for i in expected.split()], repr(text)


def test_meta_tokenizer_matches_llama2c_vectors(meta, shared):
    cases = json.loads(shared("tokenizers", "llama", "llama2c_test_vectors.json").read_text())["cases"]
    assert len(cases) == 5
    for case in cases:
        assert meta.encode(case["text"]) == case["ids_with_bos"]
    assert meta.special_ids() == {"bos_id": 1, "eos_id": 2, "pad_id": -1, "unk_id": 0}
    assert meta.vocab_size == 32000


def test_digits_are_split(meta):
    pieces = [meta.id_to_piece(i) for i in meta.encode("In 2024 we sold 1234567 units", bos=False)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024") + list("1234567")
    assert meta.encode("x", eos=True) == [1, meta.encode("x", bos=False)[0], 2]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=UNICODE_TEXT)
def test_meta_roundtrip_random_unicode(meta, text):
    assert meta.decode(meta.encode(text)) == text


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tokenizer trained on a mixture: Wikipedia summaries, CPython code and a Gutenberg book."""
    from shared_data import shared_path

    raw = shared_path("raw")
    sources = {
        "wikipedia": (d.text for d in read_documents([str(raw / "wikipedia/*.jsonl")], "jsonl", source="w")),
        "code": (d.text for d in read_documents([str(raw / "code/*.jsonl")], "jsonl", source="c")),
        "books": (d.text for d in read_documents([str(raw / "books/botchan.txt")], "gutenberg", source="b")),
    }
    samples = sample_sources(sources, max_sentences=6000, seed=0)
    texts = [s for sample in samples.values() for s in sample]
    out = tmp_path_factory.mktemp("tok")
    path = train_tokenizer(texts, 700, out / "a", max_sentences=len(texts), seed=0)
    return path, samples, texts


def test_trained_model_carries_llama_settings(trained):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(trained[0].read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert t.split_digits and t.byte_fallback and t.allow_whitespace_only_pieces
    assert t.character_coverage == pytest.approx(0.99995)
    assert t.max_sentencepiece_length == 16
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
    assert len(proto.pieces) == 700
    # layout like Meta's: <unk> <s> </s>, then the 256 byte pieces
    assert [p.piece for p in proto.pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert proto.pieces[258].piece == "<0xFF>"
    assert not any(len(p.piece) > 16 for p in proto.pieces)
    # whitespace-only pieces were learned (indentation in the code source)
    assert any(set(p.piece) == {"\u2581"} and len(p.piece) >= 4 for p in proto.pieces)


def test_every_source_is_represented(trained):
    _, samples, _ = trained
    assert set(samples) == {"wikipedia", "code", "books"}
    assert all(0 < len(s) <= 2000 for s in samples.values())
    assert len(samples["books"]) == 2000 and len(samples["code"]) == 2000  # capped, not flooded
    assert any(s.startswith("    ") for s in samples["code"])


def test_trained_tokenizer_splits_digits_and_is_deterministic(trained, tmp_path):
    path, _, texts = trained
    tok = Tokenizer(path)
    learned = [tok.id_to_piece(i) for i in range(259, tok.vocab_size)]  # after <unk> <s> </s> and the bytes
    with_digits = [p for p in learned if any(c.isdigit() for c in p)]
    assert with_digits and all(len(p) == 1 for p in with_digits)  # single digits only, never "19" or "▁2"
    again = train_tokenizer(texts, 700, tmp_path, max_sentences=len(texts), seed=0)
    assert again.read_bytes() == path.read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=UNICODE_TEXT)
def test_trained_roundtrip_random_unicode(trained, text):
    tok = Tokenizer(trained[0])
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_tiny_inputs_train(tmp_path):
    """Fewer than 100 sentences (SentencePiece's minimum sample size) still trains."""
    path = train_tokenizer([f"line {i} of a very small corpus" for i in range(50)], 300, tmp_path)
    assert Tokenizer(path).decode(Tokenizer(path).encode("a small line 7")) == "a small line 7"


def test_training_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(["", "\n\n"], 300, tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["some text here"] * 10, 100, tmp_path)
    with pytest.raises(ValueError, match="unknown trainer settings"):
        train_tokenizer(["x"], 300, tmp_path, colour="red")


def test_cli_train_encode_info(tmp_path, capsys, shared):
    books = shared("raw", "books", "pg1342_pride_and_prejudice.txt")
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                            for i in range(300)) + "{bad json\n")
    out = tmp_path / "tok"
    rc = cli(["tokenizer", "train", "--input", str(books), "--input", str(code), "--format", "jsonl",
                        "--text-field", "content", "--vocab-size", "400", "--output", str(out),
                        "--max-sentences", "3000"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.strip().endswith(f"llamalab tokenizer train: error: --input {books}: no text in "
                                                     "these files")  # the book is not JSONL
    rc = cli(["tokenizer", "train", "--input", str(code), "--format", "jsonl", "--text-field", "content",
                        "--input", f"gutenberg:{books}", "--vocab-size", "400", "--output", str(out),
                        "--max-sentences", "3000"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "source0: 600 sentences" in captured.out and "1 bad records skipped" in captured.out
    assert "source1: 1500 sentences" in captured.out  # the book, capped at half the budget
    assert f"{code}:301: malformed JSON" in captured.err
    assert cli(["tokenizer", "encode", "--model", str(out), "--json", "--no-bos", "x = 42"]) == 0
    ids = json.loads(capsys.readouterr().out)
    tok = Tokenizer(out / "tokenizer.model")
    assert ids == tok.encode("x = 42", bos=False) and tok.decode(ids) == "x = 42"
    assert cli(["tokenizer", "info", "--model", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["split_digits"] and info["byte_fallback"] and info["vocab_size"] == 400
    assert cli(["tokenizer", "info", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"llamalab tokenizer info: error: {tmp_path / 'missing'}")
