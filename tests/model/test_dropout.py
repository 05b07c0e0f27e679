"""Residual and embedding dropout applied from outside the model (``llamalab.model.dropout``)."""

import pytest
import torch

from llamalab.model import ConfigError, apply_dropout, build_model, preset_args


def _model(p: float):
    return apply_dropout(build_model(preset_args("tiny"), seed=0), p)


def test_eval_mode_and_p_zero_are_the_plain_model():
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = build_model(preset_args("tiny"), seed=0)
    with torch.no_grad():
        expected = plain(tokens)
        assert torch.equal(_model(0.3).eval()(tokens), expected)
        assert torch.equal(_model(0.0).train()(tokens), expected)
        assert not torch.equal(_model(0.3).train()(tokens), expected)


def test_each_branch_output_is_dropped_at_rate_p_and_rescaled():
    model = _model(0.25).train()
    outputs = {}
    inputs = {}

    def keep(name):
        def hook(module, args, output):  # registered after the dropout hook: sees the dropped output
            outputs[name] = output
        return hook

    def before(name):
        def hook(module, args, output):  # registered first: sees the branch's own output
            inputs[name] = output.detach().clone()
        return hook

    plain = build_model(preset_args("tiny"), seed=0).train()
    plain.tok_embeddings.register_forward_hook(before("tok_embeddings"))
    for name in ("tok_embeddings", "layers.0.attention", "layers.1.feed_forward"):
        model.get_submodule(name).register_forward_hook(keep(name))
    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        plain(tokens)
        model(tokens)
    embedded = outputs["tok_embeddings"]
    dropped = (embedded == 0).float().mean().item()
    assert 0.2 < dropped < 0.3
    kept = embedded != 0
    assert torch.allclose(embedded[kept], inputs["tok_embeddings"][kept] / 0.75)
    for name in ("layers.0.attention", "layers.1.feed_forward"):
        assert 0.2 < (outputs[name] == 0).float().mean().item() < 0.3, name


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True])
def test_a_bad_probability_is_named(p):
    with pytest.raises(ConfigError, match="model.dropout"):
        _model(p)


def test_a_pipeline_stage_without_the_embedding_gets_dropout_on_its_blocks():
    from llamalab.parallel.pipeline import stage_module

    stage = apply_dropout(stage_module(build_model(preset_args("tiny"), seed=0), range(1, 2), first=False,
                                       last=True), 0.5)
    hidden = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stage.eval()(hidden), stage(hidden))
        assert not torch.equal(stage.train()(hidden), stage.eval()(hidden))
