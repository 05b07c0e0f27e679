"""The run's facts are resolved once, without touching the user's config, and one process takes the same
parallelize path (activation checkpointing, compile) as torchrun."""

from __future__ import annotations

import copy

import pytest

from llamalab.parallel import parallelize as parallelize_module
from llamalab.train.setup import resolve
from llamalab.train.trainer import train


@pytest.mark.parametrize("native, expected", [("1", "bf16"), ("0", "fp32")])
def test_auto_precision_follows_the_hardware_and_leaves_the_config_alone(make_config, monkeypatch, native,
                                                                          expected):
    monkeypatch.setenv("LLAMALAB_FAST_BF16", native)
    cfg = make_config("--precision.mode", "auto")
    before = copy.deepcopy(cfg.to_dict())
    setup = resolve(cfg)
    assert setup.precision == expected and cfg.precision.mode == "auto"
    assert cfg.to_dict() == before
    assert (setup.dp, setup.accum, setup.step_tokens, setup.n_steps) == (1, 2, 256, 8)


def test_one_process_goes_through_parallelize_model(make_config, monkeypatch):
    calls = []
    real = parallelize_module.parallelize_model

    def spy(model, mesh, dims, **kwargs):
        calls.append((mesh, kwargs))
        return real(model, mesh, dims, **kwargs)

    monkeypatch.setattr("llamalab.parallel.runtime.parallelize_model", spy)
    result = train(make_config("--activation_checkpoint.mode", "full", "--length.steps", "2"))
    assert result.steps == 2
    assert calls == [(None, {"ac_mode": "full", "compile": False})]
