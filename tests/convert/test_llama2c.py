"""llama2.c: the published stories260K reproduces its published greedy text; our export reads back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import assert_same_tensors

from llamalab.checkpoint import load_model
from llamalab.convert.llama2c import export_llama2c, import_llama2c, read_header, write_tokenizer_bin
from llamalab.convert.spm import load_proto
from llamalab.tokenizer import Tokenizer


def llama2c_greedy(model, tokenizer: Tokenizer, prompt: str, steps: int) -> str:
    """What llama2.c's run.c prints: `steps` forward passes from BOS (prompt included), each giving the
    token at the next position; it stops early only when BOS is sampled."""
    from llamalab.generate import generate_tokens

    ids = tokenizer.encode(prompt, bos=True)
    new = generate_tokens(model, [ids], max_new_tokens=steps - len(ids) + 1, temperature=0.0,
                          eos_id=tokenizer.bos_id)[0]
    if new and new[-1] == tokenizer.bos_id:
        new = new[:-1]
    return tokenizer.decode(ids[1:] + new)


def test_stories260k_header_and_tokenizer(stories):
    folder, out = stories
    expected = json.loads((folder / "expected.json").read_text())
    args, shared_classifier = read_header(folder / "stories260K.bin")
    h = expected["header"]
    assert (args.dim, args.ffn_hidden_dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size,
            args.max_seq_len) == (h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
                                  h["vocab_size"], h["seq_len"])
    assert shared_classifier
    # the tokenizer we build from tok512.bin is the reference reconstruction, field for field
    assert load_proto(out / "tokenizer.model") == load_proto(folder / "tok512.reconstructed.model")
    assert (out / "tokenizer.model").read_bytes() == (folder / "tok512.reconstructed.model").read_bytes()


@pytest.mark.parametrize("case", [0, 1], ids=["empty-200", "once-upon-64"])
def test_stories260k_generates_published_text(stories, case):
    pytest.importorskip("llamalab.generate", reason="the generation helper has not landed yet")
    folder, out = stories
    expected = json.loads((folder / "expected.json").read_text())["greedy"][case]
    model, _, _ = load_model(out)
    text = llama2c_greedy(model, Tokenizer(out / "tokenizer.model"), expected["prompt"], expected["steps"])
    assert text == expected["text"]


def test_tokenizer_bin_export_is_llama2c_s(stories, tmp_path):
    folder, _ = stories
    write_tokenizer_bin(folder / "tok512.reconstructed.model", tmp_path / "tok512.bin")
    assert (tmp_path / "tok512.bin").read_bytes() == (folder / "tok512.bin").read_bytes()


def test_stories260k_bin_round_trip_is_byte_identical(stories, tmp_path):
    folder, out = stories
    export_llama2c(out, tmp_path / "stories260K.bin")
    assert (tmp_path / "stories260K.bin").read_bytes() == (folder / "stories260K.bin").read_bytes()
    assert (tmp_path / "tok512.bin").read_bytes() == (folder / "tok512.bin").read_bytes()


def test_native_llama2c_native_untied(tmp_path, native_dir):
    bin_path = export_llama2c(native_dir, tmp_path / "model.bin")
    _, shared_classifier = read_header(bin_path)
    assert not shared_classifier  # random output layer: written as wcls after a negative vocab_size
    back = import_llama2c(bin_path, tmp_path / "back")  # finds tok512.bin beside it
    assert_same_tensors(native_dir, back)
    ours, theirs = Tokenizer(native_dir / "tokenizer.model"), Tokenizer(back / "tokenizer.model")
    text = "Once upon a time, héllo  🙂"
    assert ours.encode(text) == theirs.encode(text)


def test_truncated_bin_is_refused(tmp_path, stories):
    folder, _ = stories
    raw = (folder / "stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"cut.bin: 1056504 bytes of weights, expected 1056512"):
        import_llama2c(tmp_path / "cut.bin", tmp_path / "out")
    (tmp_path / "v1.bin").write_bytes(b"24ka" + raw[4:])
    with pytest.raises(ValueError, match="version 1/2"):
        import_llama2c(tmp_path / "v1.bin", tmp_path / "out")


def test_tied_model_round_trip(tmp_path, stories):
    _, out = stories
    model, _, _ = load_model(out)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    bin_path = export_llama2c(out, tmp_path / "m.bin")
    assert read_header(bin_path)[1]
    assert_same_tensors(out, import_llama2c(bin_path, tmp_path / "back"))
