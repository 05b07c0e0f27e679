"""Config files and overrides: types checked, errors name the key, the paper presets carry Table 2's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalab.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["--length.steps", "12", "--optimizer.lr=2e-3", "--model.preset", "tiny",
                             "--model.dim", "96", "--precision.mode", "fp32", "--compile.enabled", "true",
                             "--run.name", "x y"])
    assert cfg.length.steps == 12 and cfg.optimizer.lr == 2e-3 and cfg.compile.enabled is True
    assert cfg.run.name == "x y" and cfg.precision.mode == "fp32"
    assert cfg.model_args().dim == 96 and cfg.model_args().n_layers == 2  # preset plus override
    assert cfg.model_args(vocab_size=777).vocab_size == 777  # from the tokenizer when not set


def test_dropout_is_written_only_when_used():
    assert "dropout" not in load_config(None, ["--length.steps", "1"]).to_dict()["model"]
    cfg = load_config(None, ["--length.steps", "1", "--model.dropout", "0.1"])
    assert cfg.model.dropout == 0.1 and cfg.to_dict()["model"]["dropout"] == 0.1


def test_integer_accepted_for_float():
    assert load_config(None, ["--length.steps", "1", "--optimizer.lr", "1"]).optimizer.lr == 1.0


@pytest.mark.parametrize("overrides, key", [
    (["--length.steps", "ten"], "length.steps"),
    (["--length.steps", "1", "--optimizer.lrr", "1"], "optimizer.lrr"),
    (["--length.steps", "1", "--optimiser.lr", "1"], "optimiser"),
    (["--length.steps", "1", "--model.dimm", "8"], "model.dimm"),
    (["--length.steps", "1", "--model.dim", "8.5"], "model.dim"),
    (["--length.steps", "1", "--model.preset", "llama-8b"], "model.preset"),
    (["--length.steps", "1", "--precision.mode", "fp16"], "precision.mode"),
    (["--length.steps", "1", "--activation_checkpoint.mode", "some"], "activation_checkpoint.mode"),
    (["--length.steps", "1", "--logging.progress", "1"], "logging.progress"),
    (["--length.steps", "-3"], "length.steps"),
    (["--length.steps", "1", "--schedule.min_lr_ratio", "2"], "schedule.min_lr_ratio"),
    (["--length.steps", "1", "--model.dim", "100"], "n_heads"),
    (["--length.steps", "1", "--model.dropout", "1"], "model.dropout"),
    (["--length.steps", "1", "--model.dropout", "no"], "model.dropout"),  # 100 not divisible by 8 heads
    (["--length.steps"], "--length.steps"),
    (["length.steps", "3"], "length.steps"),
    ([], "length"),
])
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_file_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[length]\nsteps = 3\n[batch]\nmicro_batch = "eight"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: batch\.micro_batch: expected an integer"):
        load_config(path)
    path.write_text("[length\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("name, lr", [("llama-7b", 3.0e-4), ("llama-13b", 3.0e-4), ("llama-33b", 1.5e-4),
                                      ("llama-65b", 1.5e-4)])
def test_paper_configs_carry_table_2(name, lr):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert cfg.model.preset == name and cfg.optimizer.lr == lr
    assert cfg.batch.global_tokens == 4 * 1024 * 1024 and cfg.schedule.warmup_steps == 2000
    assert (cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.weight_decay) == (0.9, 0.95, 0.1)
    assert cfg.optimizer.grad_clip == 1.0 and cfg.schedule.min_lr_ratio == 0.1
    assert cfg.length.tokens == {"llama-7b": 10**12, "llama-13b": 10**12}.get(name, 14 * 10**11)


@pytest.mark.parametrize("name", ["demo", "stories15m", "small", "shakespeare"])
def test_cpu_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    cfg.model_args(vocab_size=4096)
