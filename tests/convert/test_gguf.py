"""GGUF: metadata matches llama.cpp's own files, weights read back exactly, llama.cpp runs our export."""

from __future__ import annotations

import contextlib

import gguf
import pytest
import sentencepiece as spm
import torch
from convert_helpers import assert_same_tensors, random_native

from llamalab.checkpoint import load_model, save_pretrained
from llamalab.convert.gguf import export_gguf, import_gguf, tokenizer_proto
from llamalab.model import ModelArgs, build_model
from llamalab.tokenizer import Tokenizer

LLAMA_VOCAB = ("tokenizers", "llama", "ggml-vocab-llama-spm.gguf")


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


_CACHE: dict = {}


@pytest.fixture
def llama_vocab(shared):
    """GGUFReader over llama.cpp's vocab file (parsing 32000 strings takes seconds: read it once)."""
    path = shared(*LLAMA_VOCAB)
    if "reader" not in _CACHE:
        _CACHE["reader"] = gguf.GGUFReader(path)
    return _CACHE["reader"]


def test_native_gguf_f32_native(tmp_path, native_dir):
    path = export_gguf(native_dir, tmp_path / "m.gguf", dtype="f32")
    assert_same_tensors(native_dir, import_gguf(path, tmp_path / "back"))
    meta = fields(path)
    model, args, _ = load_model(native_dir)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 0
    assert (meta["llama.context_length"], meta["llama.embedding_length"], meta["llama.block_count"],
            meta["llama.feed_forward_length"], meta["llama.attention.head_count"],
            meta["llama.attention.head_count_kv"], meta["llama.rope.dimension_count"]) == (
        args.max_seq_len, args.dim, args.n_layers, args.ffn_hidden_dim, args.n_heads, args.kv_heads, args.head_dim)
    assert meta["llama.rope.freq_base"] == pytest.approx(args.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(args.norm_eps)
    # ggml shapes are (in, out): the reverse of ours
    reader = gguf.GGUFReader(path)
    wk = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
    assert list(wk.shape) == [args.dim, args.kv_heads * args.head_dim]


def test_f16_and_q8_0(tmp_path, stories):
    _, native = stories
    model, _, _ = load_model(native)
    ref = model.state_dict()
    back16, _, _ = load_model(import_gguf(export_gguf(native, tmp_path / "h.gguf", dtype="f16"), tmp_path / "b16"))
    for k, v in back16.state_dict().items():
        assert v.dtype == torch.float16
        assert torch.equal(v, ref[k].half()), k
    q8 = export_gguf(native, tmp_path / "q.gguf", dtype="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # 172 columns: not whole blocks
    assert kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    back8, _, _ = load_model(import_gguf(q8, tmp_path / "b8"))
    for k, v in back8.state_dict().items():  # q8_0: 32-value blocks scaled by max|x|/127 (an f16 scale)
        step = ref[k].abs().max() / 127
        assert (v - ref[k]).abs().max() <= 0.6 * step, k


def kv_bytes(reader, key: str) -> bytes:
    """The serialised key/value entry (key, type, value) of ``key`` as it lies in the file."""
    field = reader.fields[key]
    return bytes(reader.data[field.offset: field.offset + sum(p.nbytes for p in field.parts)])


@pytest.mark.slow
def test_tokenizer_metadata_matches_llama_cpp_file(tmp_path, shared, llama_vocab):
    """Our tokenizer.ggml.* for Meta's tokenizer are, byte for byte, the entries of llama.cpp's own
    ggml-vocab-llama-spm.gguf (found in our file by substring: re-parsing 32000 strings takes seconds)."""
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=32, max_seq_len=64,
                     norm_eps=1e-5)
    model = build_model(args, init=False)  # the weights do not matter here
    for p in model.parameters():
        p.data.zero_()
    native = save_pretrained(tmp_path / "n", model, tokenizer_path=shared("tokenizers", "llama", "tokenizer.model"))
    ours = export_gguf(native, tmp_path / "m.gguf").read_bytes()
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "llama.vocab_size", "llama.attention.layer_norm_rms_epsilon"):
        assert kv_bytes(llama_vocab, key) in ours, key
    for key in llama_vocab.fields:  # every key llama.cpp wrote, we write too
        if not key.startswith("GGUF."):
            assert key.encode() in ours, key


def test_tokenizer_from_llama_cpp_file_encodes_like_meta(tmp_path, shared, llama_vocab):
    proto = tokenizer_proto(llama_vocab, "fixture")
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    meta = spm.SentencePieceProcessor(model_file=str(shared("tokenizers", "llama", "tokenizer.model")))
    assert [ours.id_to_piece(i) for i in range(32000)] == [meta.id_to_piece(i) for i in range(32000)]
    cases = shared("tokenizers", "llama", "ggml-vocab-llama-spm.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = shared("tokenizers", "llama", "ggml-vocab-llama-spm.gguf.out").read_text().splitlines()
    for text, line in zip(cases, expected):
        assert ours.encode(text) == [int(x) for x in line.split()], text


# --------------------------------------------------------------------------------------------------------
# llama.cpp (optional extra `llamacpp`)


@contextlib.contextmanager
def plain_cpu_weights(llama_cpp):
    """Models loaded inside keep their weights as written (``use_extra_bufts = False``, llama.cpp's
    ``--no-repack``). On CPUs with AMX, llama.cpp (llama-cpp-python 0.3.36) repacks q8_0 weights for its AMX
    kernels and then crashes (a segmentation fault in ``llama_decode``) on stories260K's 64-wide layers; the
    plain CPU kernels compute the same products."""
    low_level = llama_cpp.llama_cpp  # the module llama_cpp.Llama takes its default parameters from
    defaults = low_level.llama_model_default_params

    def params():
        p = defaults()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low_level.llama_model_default_params = params
    try:
        yield
    finally:
        low_level.llama_model_default_params = defaults


def llama_cpp_greedy(path, prompt_ids: list[int], steps: int):
    """(greedy tokens, logits after the prompt) from llama.cpp, read with llama_get_logits_ith.

    The KV cache is kept in f32 (llama.cpp's default f16 cache moves logits by ~1e-3, enough to flip a
    near-tie of a random model).
    """
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32
    with plain_cpu_weights(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=256, type_k=f32, type_v=f32,
                              verbose=False)

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy())

    out = []
    try:
        llm.eval(list(prompt_ids))
        first = last_logits()
        for _ in range(steps):
            out.append(int(last_logits().argmax()))
            llm.eval([out[-1]])
    finally:
        llm.close()
    return out, first


def llamalab_greedy(native, prompt_ids: list[int], steps: int) -> list[int]:
    from llamalab.generate import generate_tokens

    model, _, _ = load_model(native)
    return generate_tokens(model, [prompt_ids], max_new_tokens=steps, temperature=0.0, eos_id=[])[0]


@pytest.mark.slow
@pytest.mark.parametrize(("which", "dtype"), [("stories260K", "f32"), ("random", "f32"), ("stories260K", "q8_0")])
def test_llama_cpp_runs_our_gguf(tmp_path, shared, stories, which, dtype):
    """Same greedy tokens as llamalab for 64 steps; f32 logits equal ours (q8_0 only approximately)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    native = random_native(tmp_path / "n", shared, scale=8.0) if which == "random" else stories[1]
    path = export_gguf(native, tmp_path / "m.gguf", dtype=dtype)
    tok = Tokenizer(native / "tokenizer.model")
    prompt = tok.encode("Once upon a time")
    vocab = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, vocab_only=True)
    assert vocab.tokenize(b"Once upon a time", add_bos=True) == prompt
    vocab.close()
    theirs, logits = llama_cpp_greedy(path, prompt, 64)
    model, _, _ = load_model(native)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor([prompt]))[0, -1], rtol=0,
                                   atol=1e-4 if dtype == "f32" else 0.5)  # q8_0 also quantizes activations
    assert theirs == llamalab_greedy(native, prompt, 64)
