"""LoRA on an int8 base (``lora.base_dtype = "int8"``): the frozen linear weights are the inference quantizer's
int8, gradients reach every adapter (through the frozen int8 layers) and nothing else, a run trains, resumes
exactly and merges into the original fp32 base, and bad settings are one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from finetune_helpers import finetune_overrides
from safetensors.torch import load_file

from llamalab.checkpoint import load_model
from llamalab.cli import main
from llamalab.config import LORA_TARGETS, OptimizerConfig, load_config
from llamalab.finetune.lora import (
    FrozenInt8Linear,
    LoRALinear,
    apply_lora,
    merge_adapters,
    quantize_base,
    trainable_parameters,
)
from llamalab.finetune.peft_export import read_adapter
from llamalab.finetune.task import FinetuneTask
from llamalab.inference.quantize import quantize_int8, quantize_per_channel
from llamalab.parallel.safe_dcp import read_dcp_metadata
from llamalab.train.metrics import read_metrics
from llamalab.train.optim import build_optimizer
from llamalab.train.trainer import train

TOKENS = torch.tensor([[1, 5, 17, 99, 240, 3, 511, 42, 8, 77]])
INT8 = ["--lora.base_dtype", "int8"]


class Killed(Exception):
    pass


def int8_lora_model(base, targets=("wq", "wv", "w2"), seed=0):
    model, _, _ = load_model(base, dtype=torch.float32)
    torch.manual_seed(seed)
    apply_lora(model, list(targets), 4, 8.0)
    quantize_base(model)
    return model


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["split"] == "train"}


def test_zero_adapters_compute_the_inference_quantizers_model(base, monkeypatch):
    """B = 0: the int8-base LoRA model's logits are those of the base quantized by
    ``llamalab.inference.quantize.quantize_int8`` (no LoRA code involved): bit for bit where the reference takes
    its unfused branch (the product training uses), within fp32 rounding (1e-5) of its fused decoding kernel,
    which sums in another order. Against the fp32 base they are within 2% of the logits' range: per-channel
    rounding moves each weight by at most half a step, max|row| / 254 (0.4% of the row's largest weight), and
    those independent errors partly cancel in each dot product (measured: ~0.7%, 1000x the fused/unfused gap)."""
    model = int8_lora_model(base, targets=LORA_TARGETS).eval()
    reference = quantize_int8(load_model(base, dtype=torch.float32)[0]).eval()
    fp32 = load_model(base, dtype=torch.float32)[0].eval()
    with torch.no_grad():
        ours, fused, exact = model(TOKENS), reference(TOKENS), fp32(TOKENS)
        monkeypatch.setattr("llamalab.inference.quantize.fused_kernel_fits", lambda weight, flat: False)
        unfused = reference(TOKENS)
    assert torch.equal(ours, unfused)
    torch.testing.assert_close(ours, fused, rtol=1e-5, atol=1e-6)
    error = (ours - exact).abs().max()
    assert 1e-4 < error < 0.02 * exact.abs().max()

    # every linear layer is int8 (wrapped or not); the embedding and the norms stay fp32
    plain = int8_lora_model(base, targets=["wq"])
    int8 = {n for n, b in plain.named_buffers() if b.dtype == torch.int8}
    assert int8 == {f"{n}.weight" for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(int8) == 2 * 7 + 1
    assert isinstance(plain.layers["0"].attention.wq, LoRALinear)
    assert isinstance(plain.layers["0"].attention.wk, FrozenInt8Linear) and isinstance(plain.output, FrozenInt8Linear)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert plain.tok_embeddings.weight.dtype == torch.float32
    # the state dict (so a checkpoint) holds the adapters and the fp32 frozen tensors, no int8 and no scales
    state = plain.state_dict()
    assert not any(t.dtype == torch.int8 or k.endswith(".scales") for k, t in state.items())
    assert "layers.0.attention.wq.weight" not in state and "layers.0.attention.wq.lora_A.weight" in state
    trainable, total = trainable_parameters(plain)
    assert total == sum(p.numel() for p in fp32.parameters()) + trainable  # the int8 weights counted


def test_gradients_reach_every_adapter_through_the_int8_layers_and_nothing_else(base):
    """The backward pass through frozen int8 layers gives the adapters the gradients of a model whose frozen
    weights are the same int8 values dequantized to fp32 (so the gradient is exact, not an approximation's);
    AdamW holds the adapters only and a step leaves the int8 base untouched."""
    model = int8_lora_model(base)
    dequantized, _, _ = load_model(base, dtype=torch.float32)
    with torch.no_grad():
        for module in dequantized.modules():
            if isinstance(module, torch.nn.Linear):
                q, scales = quantize_per_channel(module.weight)
                module.weight.copy_(q.float() * scales[:, None])
    torch.manual_seed(0)
    apply_lora(dequantized, ["wq", "wv", "w2"], 4, 8.0)
    for m in (model, dequantized):
        with torch.no_grad():  # B != 0 so that A gets gradients too
            for name, p in m.named_parameters():
                if name.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        m(TOKENS).logsumexp(-1).mean().backward()
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    reference = dict(dequantized.named_parameters())
    assert len(adapters) == 2 * 3 * 2
    for name, p in adapters.items():  # layer 0's reach the loss only through layer 1's and the output's int8
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, reference[name].grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)

    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    before = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.int8 or n.endswith(".scales")}
    optimizer.step()
    assert set(optimizer.state) == set(adapters.values())
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers() if n in before)


@pytest.fixture(scope="module")
def straight(base, alpaca_file, tmp_path_factory):
    """8 LoRA steps on an int8 base (wq wk wv wo adapted; dropout 0.1), uninterrupted."""
    out = tmp_path_factory.mktemp("int8") / "straight"
    cfg = load_config(None, finetune_overrides(base, alpaca_file, out) + INT8)
    train(cfg, task=FinetuneTask(cfg))
    return out


def test_an_int8_base_run_trains_the_adapters_only_and_merges_into_the_fp32_base(straight, base):
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
    metadata = read_dcp_metadata(straight / "checkpoints" / "step-00000008" / "dcp").state_dict_metadata
    optimizer_keys = [k for k in metadata if k.startswith("optimizer.state.")]
    assert optimizer_keys and all(".lora_" in k for k in optimizer_keys)
    model_keys = {k for k in metadata if k.startswith("model.")}  # adapters, embedding, norms; no int8 weights
    assert "model.layers.0.attention.wq.lora_B.weight" in model_keys and "model.tok_embeddings.weight" in model_keys
    assert not any(k.endswith((".scales", "wq.weight", "w1.weight", "output.weight")) for k in model_keys)

    # final/ = the original (unquantized) base + scaling * B @ A, the frozen layers bit for bit the base's
    final = load_file(str(straight / "final" / "model.safetensors"))
    base_weights = load_file(str(base / "model.safetensors"))
    adapters, scaling, _ = read_adapter(straight / "adapter")
    expected = merge_adapters(base_weights, adapters, scaling)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert torch.equal(final["layers.0.feed_forward.w1.weight"], base_weights["layers.0.feed_forward.w1.weight"])
    assert not torch.equal(final["layers.0.attention.wq.weight"], base_weights["layers.0.attention.wq.weight"])


def test_resume_after_a_crash_is_exact(straight, base, alpaca_file, tmp_path):
    """6 steps, a crash (after the step-4 checkpoint), --resume auto: the base is read and quantized again, and
    every loss, the adapter and final/ equal the uninterrupted run's bit for bit."""
    def on_step(step, record):
        if step == 6:
            raise Killed

    crashed = load_config(None, finetune_overrides(base, alpaca_file, tmp_path / "run") + INT8)
    with pytest.raises(Killed):
        train(crashed, task=FinetuneTask(crashed), on_step=on_step)
    resumed = load_config(None, finetune_overrides(base, alpaca_file, tmp_path / "run") + INT8
                          + ["--checkpoint.resume", "auto"])
    assert train(resumed, task=FinetuneTask(resumed)).steps == 8
    assert train_losses(tmp_path / "run") == train_losses(straight)
    for name in ("adapter/adapter_model.safetensors", "final/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(tmp_path / "run" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("extra, message", [
    (["--lora.base_dtype", "fp16"], r"lora.base_dtype: expected one of 'fp32', 'bf16', 'int8', got 'fp16'"),
    (INT8 + ["--finetune.method", "full"], r"lora.base_dtype: 'int8' freezes the base, so it needs "
                                           r"finetune.method = 'lora'"),
])
def test_bad_base_dtype_settings_are_one_line_errors(base, alpaca_file, tmp_path, capsys, extra, message):
    assert main(["finetune", "/dev/null", *finetune_overrides(base, alpaca_file, tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamalab finetune: error: ") and "\n" not in err
    assert re.search(message, err), err
