import json

import pytest
import torch

import llamalab
from llamalab.checkpoint import save_pretrained
from llamalab.model import build_model, preset_args


def test_native_round_trip(tmp_path):
    model = build_model(preset_args("tiny"), seed=3)
    save_pretrained(tmp_path / "ck", model, special_ids={"bos_id": 1, "eos_id": 2, "pad_id": -1, "unk_id": 0})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["dim"] == 64 and cfg["n_kv_heads"] == 2 and cfg["bos_id"] == 1
    loaded = llamalab.load(tmp_path / "ck")
    assert loaded.tokenizer is None and loaded.special_ids["eos_id"] == 2
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model.eval()(tokens))
    bf16 = llamalab.load(tmp_path / "ck", dtype="bf16")
    assert bf16.model.output.weight.dtype == torch.bfloat16


def test_load_errors_name_the_problem(tmp_path):
    model = build_model(preset_args("tiny"), seed=3)
    save_pretrained(tmp_path / "ck", model)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["dim"] = 128
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatches .*layers.0.attention.wq.weight: file \(64, 64\) != model \(128, 128\)"):
        llamalab.load(tmp_path / "ck")
    cfg["dim"] = 64
    cfg["hidden"] = 3
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden"):
        llamalab.load(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="config.json"):
        llamalab.load(tmp_path / "nothing")
