"""LoRA: the base is unchanged at step 0, merging folds the exact update in, only adapters train, and PEFT
loads our adapters onto our Hugging Face export with our logits."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.checkpoint import load_model
from llamalab.config import LORA_TARGETS, OptimizerConfig
from llamalab.finetune.lora import (
    LoRALinear,
    apply_lora,
    lora_scaling,
    merge_adapters,
    split_adapters,
)
from llamalab.train.optim import build_optimizer

TOKENS = torch.tensor([[1, 5, 17, 99, 240, 3, 511, 42, 8, 77]])


def lora_model(base, targets=LORA_TARGETS, rank=4, alpha=8.0, rslora=False, seed=0):
    model, args, _ = load_model(base, dtype=torch.float32)
    torch.manual_seed(seed)
    apply_lora(model, list(targets), rank, alpha, rslora=rslora)
    return model, args


def randomize_b(model, seed=1):
    """Nonzero B matrices, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_zero_initialised_adapters_leave_the_logits_unchanged(base):
    reference, _, _ = load_model(base, dtype=torch.float32)
    model, _ = lora_model(base)
    assert torch.equal(model(TOKENS), reference(TOKENS))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7 + 1  # 7 matrices per layer and the output layer
    for m in wrapped:  # PEFT's init: B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5))
        assert not m.lora_B.weight.any()
        bound = 1 / math.sqrt(m.in_features)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.8 * bound


def test_names_keep_metas_and_add_the_adapters(base):
    model, _ = lora_model(base, targets=["wq", "output"])
    names = dict(model.named_parameters())
    assert "layers.0.attention.wq.weight" in names and "layers.0.attention.wq.lora_A.weight" in names
    assert "output.lora_B.weight" in names and "layers.0.attention.wk.lora_A.weight" not in names
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == {n for n in names if ".lora_" in n}


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weights_give_the_adapter_models_logits(base, rslora):
    model, _ = lora_model(base, rank=4, alpha=8.0, rslora=rslora)
    randomize_b(model)
    with torch.no_grad():
        expected = model(TOKENS)
    scaling = lora_scaling(4, 8.0, rslora)
    assert scaling == (8.0 / 2 if rslora else 8.0 / 4)
    plain, _, _ = load_model(base, dtype=torch.float32)
    base_state, adapters = split_adapters(model.state_dict())
    plain.load_state_dict(merge_adapters(base_state, adapters, scaling))
    with torch.no_grad():
        merged = plain(TOKENS)
    assert (merged - expected).abs().max() < 1e-5
    assert (merged - load_model(base, dtype=torch.float32)[0](TOKENS)).abs().max() > 1e-2  # the update matters


def test_the_optimizer_state_holds_only_the_adapters(base):
    model, _ = lora_model(base, targets=["wq", "wv", "w2"])
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    model(TOKENS).logsumexp(-1).mean().backward()
    optimizer.step()
    adapters = {p for n, p in model.named_parameters() if ".lora_" in n}
    assert set(optimizer.state) == adapters and len(adapters) == 2 * 3 * 2
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if t.ndim)
    assert state_bytes == 2 * 4 * sum(p.numel() for p in adapters)  # two fp32 moments per adapter value


def test_a_bf16_base_trains_fp32_adapters(base):
    model, _, _ = load_model(base, dtype=torch.bfloat16)
    apply_lora(model, ["wq", "wv"], 4, 8.0)
    randomize_b(model)
    loss = model(TOKENS).float().logsumexp(-1).mean()
    loss.backward()
    lora_a = model.layers["0"].attention.wq.lora_A.weight
    assert lora_a.dtype == torch.float32 and lora_a.grad is not None
    assert model.layers["0"].attention.wq.weight.dtype == torch.bfloat16


def test_peft_loads_our_adapters_onto_our_hf_export(base, tmp_path):
    """``PeftModel.from_pretrained`` on our HF export computes our LoRA model's logits (fp32): the adapters'
    keys name HF's modules and B's rows of wq/wk follow the export's q/k permutation (GQA: 4 q, 2 kv heads)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llamalab.config import LoraConfig
    from llamalab.convert.hf import export_hf
    from llamalab.finetune.peft_export import read_adapter, write_adapter

    model, args = lora_model(base, rank=4, alpha=8.0, rslora=True)
    randomize_b(model)
    with torch.no_grad():
        ours = model(TOKENS)
    adapter = write_adapter(tmp_path / "adapter", split_adapters(model.state_dict())[1], args,
                            LoraConfig(rank=4, alpha=8.0, rslora=True, target_modules=list(LORA_TARGETS)), base)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(base, tmp_path / "hf"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(TOKENS).logits
    assert (theirs - ours).abs().max() < 1e-5
    assert (theirs - load_model(base)[0](TOKENS)).abs().max() > 1e-2  # the adapters were applied

    adapters, scaling, folder = read_adapter(adapter)  # and back: the same tensors under Meta's names
    assert folder == base.resolve() and scaling == 8.0 / 2
    for name, tensor in split_adapters(model.state_dict())[1].items():
        assert torch.equal(adapters[name], tensor), name
