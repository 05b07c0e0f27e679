"""Hugging Face folders: transformers loads our export and gives our logits; we import theirs back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import RANDOM_ARGS, assert_same_tensors, random_native

from llamalab.checkpoint import load_model
from llamalab.convert.hf import export_hf, import_hf
from llamalab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SAMPLES = ["Once upon a time, there was a little girl named Lily.", " leading space", "  two\n\nnew lines ",
           "héllo 日本 🙂", "", "   ", "12 345 6789", "Lily's mom said, \"Lily, let's go!\""]


def llama_cpp_vocab_cases(shared) -> list[str]:
    """llama.cpp's 46 tokenizer test strings (each followed by a separator line)."""
    text = shared("tokenizers", "llama", "ggml-vocab-llama-spm.gguf.inp").read_text()
    return text.split("\n__ggml_vocab_test__\n")[:-1]


def test_native_hf_native_round_trip_and_logits(tmp_path, native_dir):
    hf_dir = export_hf(native_dir, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours, _, _ = load_model(native_dir)
    tokens = torch.randint(0, RANDOM_ARGS.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)

    back = import_hf(hf_dir, tmp_path / "back")
    assert_same_tensors(native_dir, back)
    assert (back / "tokenizer.model").read_bytes() == (native_dir / "tokenizer.model").read_bytes()


def test_hf_tokenizer_ids_equal_sentencepiece(tmp_path, native_dir, shared):
    hf_dir = export_hf(native_dir, tmp_path / "hf")
    cases = SAMPLES + llama_cpp_vocab_cases(shared)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = Tokenizer(native_dir / "tokenizer.model")
    for text in cases:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_meta_tokenizer_through_hf_export(tmp_path, shared):
    """Meta's own 32k tokenizer keeps sentencepiece's ids through our tokenizer.json (leading spaces too)."""
    from llamalab.convert.hf import write_hf_tokenizer

    src = shared("tokenizers", "llama", "tokenizer.model")
    (tmp_path / "hf").mkdir()
    write_hf_tokenizer(tmp_path / "hf", src, 2048)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(src)
    cases = llama_cpp_vocab_cases(shared)
    expected = shared("tokenizers", "llama", "ggml-vocab-llama-spm.gguf.out").read_text().splitlines()
    assert len(cases) == len(expected)
    for text, line in zip(cases, expected):
        want = [1] + [int(x) for x in line.split()]
        assert ours.encode(text) == want, text
        assert theirs(text)["input_ids"] == want, text


def test_sharded_export_with_index(tmp_path, native_dir):
    hf_dir = export_hf(native_dir, tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (hf_dir / "model.safetensors").exists()
    assert all((hf_dir / f).stat().st_size <= 100_000 + 512 * 64 * 4 for f in files)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours, _, _ = load_model(native_dir)
    tokens = torch.arange(40).view(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)
    assert_same_tensors(native_dir, import_hf(hf_dir, tmp_path / "back"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_transformers_checkpoint(tmp_path, tied):
    """A checkpoint saved by transformers itself (GQA; tied embeddings have no lm_head in the file;
    the tied one is also sharded by transformers, with its index)."""
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=136, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=3, vocab_size=300,
                                   max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="60KB" if tied else "5GB")  # tied: also sharded
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == tied
    out = import_hf(tmp_path / "hf", tmp_path / "native")
    ours, args, _ = load_model(out)
    assert args.kv_heads == 3 and args.ffn_hidden_dim == 136
    tokens = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)
    if tied:
        assert torch.equal(ours.output.weight, ours.tok_embeddings.weight)


def test_shape_mismatch_names_keys(tmp_path, native_dir):
    from safetensors.torch import load_file, save_file

    hf_dir = export_hf(native_dir, tmp_path / "hf")
    state = load_file(str(hf_dir / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1].contiguous()
    del state["model.norm.weight"]
    save_file(state, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\].*layers.1.feed_forward.w3.weight: file \(223, 64\)"):
        import_hf(hf_dir, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_random_native_helper_uses_gqa(tmp_path, shared):
    """Guard: the fixture really exercises grouped-query attention and a multiplier FFN."""
    _, args, _ = load_model(random_native(tmp_path / "n", shared))
    assert args.kv_heads < args.n_heads and args.ffn_dim_multiplier is not None


def test_refuses_other_architectures(tmp_path, native_dir):
    hf_dir = export_hf(native_dir, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config.json: architectures \['MistralForCausalLM'\] is not LlamaForCausalLM"):
        import_hf(hf_dir, tmp_path / "back")
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(ValueError, match="rope scaling"):
        import_hf(hf_dir, tmp_path / "back")
