"""Meta's consolidated.NN.pth: split the way Meta's model-parallel checkpoints are, merged back exactly."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch
from convert_helpers import RANDOM_ARGS, assert_same_tensors, random_native

from llamalab.checkpoint import load_model
from llamalab.convert.meta import export_meta, import_meta


@pytest.mark.parametrize("shards", [2, 4])
def test_native_meta_native(tmp_path, shared, shards):
    # Meta splits whole kv heads across ranks, so 4 shards need 4 kv heads
    native_dir = random_native(tmp_path / "native", shared, replace(RANDOM_ARGS, n_kv_heads=shards))
    meta_dir = export_meta(native_dir, tmp_path / "meta", shards=shards)
    files = sorted(p.name for p in meta_dir.glob("consolidated.*.pth"))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    back = import_meta(meta_dir, tmp_path / "back", max_seq_len=128)
    assert_same_tensors(native_dir, back)
    assert json.loads((back / "config.json").read_text()) == json.loads((native_dir / "config.json").read_text())


def test_shard_layout_is_metas(tmp_path, native_dir):
    """Per-rank shapes follow LLaMA-13B's published 2-way split: e.g. tok_embeddings [32000, 2560],
    wq [2560, 5120], wo [5120, 2560], w2 [5120, 6912], output [16000, 5120] (here scaled down)."""
    model, args, _ = load_model(native_dir)
    export_meta(native_dir, tmp_path / "meta", shards=2)
    rank1 = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    d, h, v, kv = args.dim, args.ffn_hidden_dim, args.vocab_size, args.kv_heads * args.head_dim
    assert rank1["tok_embeddings.weight"].shape == (v, d // 2)
    assert rank1["layers.0.attention.wq.weight"].shape == (d // 2, d)
    assert rank1["layers.0.attention.wk.weight"].shape == (kv // 2, d)
    assert rank1["layers.0.attention.wo.weight"].shape == (d, d // 2)
    assert rank1["layers.0.feed_forward.w2.weight"].shape == (d, h // 2)
    assert rank1["layers.0.feed_forward.w3.weight"].shape == (h // 2, d)
    assert rank1["output.weight"].shape == (v // 2, d)
    assert torch.equal(rank1["layers.1.ffn_norm.weight"], model.layers["1"].ffn_norm.weight)
    # rank 1 holds the second half: the query heads n_heads/2.. and the embedding columns d/2..
    assert torch.equal(rank1["layers.0.attention.wq.weight"], model.layers["0"].attention.wq.weight[d // 2:])
    assert torch.equal(rank1["tok_embeddings.weight"], model.tok_embeddings.weight[:, d // 2:])
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["n_kv_heads"] == args.kv_heads and params["vocab_size"] == v


def test_llama1_params_and_rope_freqs(tmp_path, native_dir):
    """LLaMA-1 writes vocab_size -1 and stores rope.freqs; both are handled."""
    meta_dir = export_meta(native_dir, tmp_path / "meta", shards=1)
    params = json.loads((meta_dir / "params.json").read_text())
    params["vocab_size"] = -1
    (meta_dir / "params.json").write_text(json.dumps(params))
    state = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    state["rope.freqs"] = torch.ones(4)
    torch.save(state, meta_dir / "consolidated.00.pth")
    assert_same_tensors(native_dir, import_meta(meta_dir, tmp_path / "back", max_seq_len=128))


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/llamalab_pwned_by_pickle",))


def test_pickled_code_is_never_run(tmp_path, native_dir):
    meta_dir = export_meta(native_dir, tmp_path / "meta", shards=1)
    with open(meta_dir / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": _Exploit()}, f)
    marker = __import__("pathlib").Path("/tmp/llamalab_pwned_by_pickle")
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot be loaded as plain tensors"):
        import_meta(meta_dir, tmp_path / "back")
    assert not marker.exists()


def test_mismatch_lists_keys_and_shapes(tmp_path, native_dir):
    meta_dir = export_meta(native_dir, tmp_path / "meta", shards=2)
    state = torch.load(meta_dir / "consolidated.01.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"][:-2].clone()
    torch.save(state, meta_dir / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated.01.pth: layers.0.attention.wq.weight has shape \(30, 64\)"):
        import_meta(meta_dir, tmp_path / "back")
    params = json.loads((meta_dir / "params.json").read_text())
    params["dim"] = 128
    (meta_dir / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=r"shape mismatches .*layers.0.attention.wq.weight: file \(64, 64\) != model \(128, 128\)"):
        import_meta(meta_dir, tmp_path / "back")
    with pytest.raises(ValueError, match=r"8 model-parallel shards: \{.n_kv_heads.: 2\} not divisible by 8"):
        export_meta(native_dir, tmp_path / "m4", shards=4 * 2)
