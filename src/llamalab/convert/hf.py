"""Hugging Face ``LlamaForCausalLM`` <-> Meta names, the one place that permutes q/k rows.

Meta rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates halves (x[i], x[i + d/2]). The two
are the same model once the rows of ``wq`` and ``wk`` are permuted within each head, which is what
``permute_to_hf`` / ``permute_from_hf`` do (the same permutation as transformers' own converter).
"""

from __future__ import annotations

import re

import torch

from ..model import ModelArgs
from ..model.args import ffn_params_for_hidden

_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_META_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_META_TOP = {v: k for k, v in _TOP_MAP.items()}


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Meta's wq/wk (interleaved pairs per head) -> HF's rotate-half order."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_to_hf``."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_name_to_hf(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


def hf_name_to_meta(name: str) -> str | None:
    """Meta name for an HF key; None for keys HF stores but LLaMA derives (rotary inv_freq)."""
    if name in _HF_TO_META_TOP:
        return _HF_TO_META_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_TO_META_LAYER:
        return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(f"unexpected Hugging Face parameter {name!r} (not a LlamaForCausalLM weight)")


def meta_to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_to_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_to_hf(tensor, args.kv_heads)
        out[meta_name_to_hf(name)] = tensor.contiguous()
    return out


def hf_to_meta_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        meta = hf_name_to_meta(name)
        if meta is None:
            continue
        if meta.endswith("attention.wq.weight"):
            tensor = permute_from_hf(tensor, args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            tensor = permute_from_hf(tensor, args.kv_heads)
        out[meta] = tensor.contiguous()
    if "output.weight" not in out and "tok_embeddings.weight" in out:  # tied checkpoints (tie_word_embeddings)
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def hf_config(args: ModelArgs, special_ids: dict[str, int] | None = None, torch_dtype: str = "float32") -> dict:
    """A ``LlamaConfig`` dict for ``args`` (what ``config.json`` of an HF export holds)."""
    special = special_ids or {}
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
    }
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        if special.get(ours, -1) >= 0:
            cfg[theirs] = special[ours]
    return cfg


def args_from_hf_config(cfg: dict, source: str = "config.json") -> tuple[ModelArgs, dict[str, int]]:
    """ModelArgs and special ids from an HF ``LlamaConfig`` dict; refuses what LLaMA cannot represent."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"{source}: model_type {cfg.get('model_type')!r} is not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{source}: {key}=true is not a LLaMA model (LLaMA has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r}; LLaMA's SwiGLU uses 'silu'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{source}: rope scaling {rope!r} is not supported (plain RoPE only)")
    dim = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    multiple_of, multiplier = ffn_params_for_hidden(dim, cfg["intermediate_size"])
    args = ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
    )
    if args.ffn_hidden_dim != cfg["intermediate_size"]:
        raise ValueError(f"{source}: intermediate_size {cfg['intermediate_size']} cannot be represented")
    special = {}
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        value = cfg.get(theirs)
        if isinstance(value, int):
            special[ours] = value
    return args, special
