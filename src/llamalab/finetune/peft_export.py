"""LoRA adapters in Hugging Face PEFT's layout, against our Hugging Face export's module names.

An adapter folder holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and ``adapter_model.safetensors``
with PEFT's keys: ``layers.0.attention.wq.lora_A.weight`` is saved as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and ``output`` as ``lm_head``, so
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_export), folder)`` computes our logits.
Our Hugging Face export permutes the rows of ``wq`` and ``wk`` (interleaved rotary pairs -> rotate-half); the
update B @ A has the rows of B, so B of ``wq``/``wk`` goes through the same permutation
(``convert.hf.meta_to_hf_state``) and A, whose columns are the layer's inputs, does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import TOKENIZER_NAME, load_model, naming_safetensors_errors, read_config, save_pretrained
from ..convert.hf import hf_name_to_meta, hf_tensor_to_meta, meta_name_to_hf, meta_to_hf_state
from ..errors import UserError
from ..fs import atomic_write_dir, read_json_object
from ..model import ModelArgs
from .lora import ADAPTER_MARK, lora_scaling, merge_adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_LAYOUT = f"a PEFT adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped LlamaForCausalLM


def to_peft_state(adapters: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Adapter tensors under Meta's names -> PEFT's keys, in our HF export's row order."""
    out = {}
    for name, tensor in adapters.items():
        module, kind = name.split(ADAPTER_MARK)  # "layers.0.attention.wq", "A.weight"
        if kind == "B.weight":
            ((hf_name, tensor),) = meta_to_hf_state({f"{module}.weight": tensor}, args).items()
        else:
            hf_name = meta_name_to_hf(f"{module}.weight")
        out[f"{PEFT_PREFIX}{hf_name.removesuffix('.weight')}.lora_{kind}"] = tensor.contiguous()
    return out


def from_peft_state(state: dict[str, torch.Tensor], args: ModelArgs, source: str) -> dict[str, torch.Tensor]:
    """The inverse of ``to_peft_state``; a key PEFT would not write for a LLaMA model is an error."""
    out = {}
    for key, tensor in state.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        if not key.startswith(PEFT_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise UserError(f"{source}: unexpected key {key!r}; expected {PEFT_PREFIX}<module>.lora_A.weight / "
                            ".lora_B.weight")
        try:
            if kind == "B.weight":
                meta, tensor = hf_tensor_to_meta(f"{module}.weight", tensor, args)
            else:
                meta = hf_name_to_meta(f"{module}.weight")
        except ValueError as exc:
            raise UserError(f"{source}: {exc}") from None
        out[f"{meta.removesuffix('.weight')}{ADAPTER_MARK}{kind}"] = tensor
    return out


def peft_config(lora, targets: list[str], base: str) -> dict:
    """PEFT's ``LoraConfig`` for our adapters (``targets``: HF module names such as ``q_proj``)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "use_rslora": lora.rslora, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True}


def write_adapter(folder: str | Path, adapters: dict[str, torch.Tensor], args: ModelArgs, lora, base: str | Path,
                  force: bool = False) -> Path:
    """Write ``adapters`` (Meta names, from a LoRA model's state) for the ``[lora]`` settings ``lora``; the
    config names ``base``, the native folder they were trained on, as the base model."""
    state = {k: v.detach().float().cpu() for k, v in to_peft_state(adapters, args).items()}
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
    config = peft_config(lora, targets, str(Path(base).resolve()))

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "producer": "llamalab"})

    return atomic_write_dir(Path(folder), write, owned=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), what="PEFT adapter folder",
                            force=force)


def read_adapter(folder: str | Path, base: str | Path | None = None) -> tuple[dict[str, torch.Tensor], float, Path]:
    """(adapters under Meta's names, scaling, base folder) of an adapter folder; ``base`` overrides the one its
    config names."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    config = read_json_object(config_path, ADAPTER_LAYOUT)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA adapters can be merged")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise UserError(f"{config_path}: {key} is {config.get(key)!r}, expected a positive number")
    base = Path(base or config.get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise UserError(f"{config_path}: the base model {str(base)!r} is not a native checkpoint folder; pass "
                        "--base FOLDER (the native model the adapter was trained on)")
    args, _ = read_config(base)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; {ADAPTER_LAYOUT}")
    with naming_safetensors_errors(weights):
        state = load_file(str(weights))
    scaling = lora_scaling(config["r"], config["lora_alpha"], bool(config.get("use_rslora")))
    return from_peft_state(state, args, str(weights)), scaling, base


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None,
                  force: bool = False) -> Path:
    """Write a native checkpoint of the base model with the adapters folded in (W + scaling * B @ A), in the
    base's stored dtype, with its tokenizer."""
    adapters, scaling, base = read_adapter(adapter_dir, base)
    model, _, special = load_model(base)
    try:
        model.load_state_dict(merge_adapters(model.state_dict(), adapters, scaling))
    except ValueError as exc:
        raise UserError(f"{adapter_dir}: {exc}") from None
    tokenizer = base / TOKENIZER_NAME
    return save_pretrained(out, model, tokenizer if tokenizer.is_file() else None, special_ids=special, force=force)
