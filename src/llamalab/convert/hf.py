"""Hugging Face ``LlamaForCausalLM`` <-> Meta names, the one place that permutes q/k rows.

Meta rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates halves (x[i], x[i + d/2]). The two
are the same model once the rows of ``wq`` and ``wk`` are permuted within each head, which is what
``permute_to_hf`` / ``permute_from_hf`` do (the same permutation as transformers' own converter).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import CHAT_TEMPLATE_NAME, naming_safetensors_errors, read_chat_template
from ..errors import UserError
from ..fs import atomic_write_dir, read_json_object
from ..model import ModelArgs
from ..model.args import ffn_params_for_hidden
from .common import load_torch_tensors

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
    raise ValueError(f"unexpected Hugging Face parameter {name!r} (not a LlamaForCausalLM weight)")


def meta_to_hf_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_to_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_to_hf(tensor, args.kv_heads)
        out[meta_name_to_hf(name)] = tensor.contiguous()
    return out


def hf_tensor_to_meta(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str | None, torch.Tensor]:
    """(Meta name, tensor in Meta's layout) for one HF tensor; the name is None for derived buffers."""
    meta = hf_name_to_meta(name)
    if meta is not None and meta.endswith("attention.wq.weight"):
        tensor = permute_from_hf(tensor, args.n_heads)
    elif meta is not None and meta.endswith("attention.wk.weight"):
        tensor = permute_from_hf(tensor, args.kv_heads)
    return meta, tensor


def hf_to_meta_state(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        meta, tensor = hf_tensor_to_meta(name, tensor, args)
        if meta is not None:
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


HF_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


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
    missing = [k for k in HF_REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}; a LlamaConfig has "
                         f"{', '.join(HF_REQUIRED_KEYS)}")
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


# ----------------------------------------------------------------------------------------------------------
# Folder-level export and import

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_FILES = ("config.json", "generation_config.json", HF_WEIGHTS, "model-*-of-*.safetensors", HF_INDEX,
            "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            CHAT_TEMPLATE_NAME)
HF_LAYOUT = f"a Hugging Face model folder holds config.json and {HF_WEIGHTS} (or shards listed in {HF_INDEX})"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"`` / ``"2GiB"`` (what ``--max-shard-size`` takes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not m:
        raise ValueError(f"invalid size {size!r}; expected bytes or a number with KB/MB/GB/KiB/MiB/GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


def shard_state(state: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` (in order) into shards of at most ``max_shard_size`` bytes (a bigger tensor goes alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(folder: Path, state: dict[str, torch.Tensor], max_shard_size: int) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` (HF's layout)."""
    from safetensors.torch import save_file

    shards = shard_state(state, max_shard_size)
    if len(shards) == 1:
        save_file(shards[0], str(folder / HF_WEIGHTS), metadata={"format": "pt"})
        return [HF_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [HF_INDEX]


def write_hf_tokenizer(folder: Path, tokenizer_path: Path, max_seq_len: int,
                       chat_template: str | None = None) -> None:
    """``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``chat_template`` goes into ``tokenizer_config.json`` as ``chat_template`` (what ``apply_chat_template`` uses).

    transformers 5 converts a bare ``tokenizer.model`` with a Metaspace pre-tokenizer (drops the space of
    text that starts with one) and BPE merges ranked by id (LLaMA gives whitespace pieces score -1e9, so
    ``" Hello"`` splits differently). We write ``tokenizer.json`` ourselves with SentencePiece's rules and
    point ``tokenizer_config.json`` at the plain fast tokenizer, so ``AutoTokenizer`` gives SentencePiece's ids.
    """
    from ..tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    special = {}
    for key, sid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("unk_token", tok.unk_id),
                     ("pad_token", tok.pad_id)):
        if sid >= 0:
            special[key] = tok.id_to_piece(sid)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": tok.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": max_seq_len,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    try:
        fast = sentencepiece_to_tokenizers(tokenizer_path)
    except ImportError:
        print("note: the `tokenizers` package is missing; tokenizer.json not written "
              "(AutoTokenizer will convert tokenizer.model itself, with different ids for leading spaces)")
    else:
        fast.save(str(folder / "tokenizer.json"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def sentencepiece_to_tokenizers(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like a SentencePiece BPE model (byte fallback).

    SentencePiece merges the adjacent pair whose merged piece scores highest; ranking the merges by that
    score (ties as transformers orders them) makes HF's BPE take the same steps.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    from .spm import SentencePiece, load_proto

    proto = load_proto(model_path)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ValueError(f"{model_path}: only SentencePiece BPE models can be exported to tokenizer.json")
    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = []
    for p in pieces:
        if p.type != SentencePiece.NORMAL:
            continue
        local = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))
                 if p.piece[:k] in vocab and p.piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(-p.score, left, right) for left, right in local]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))  # stable: keeps the per-piece order
    spec = proto.trainer_spec
    model = models.BPE(vocab=vocab, merges=[(left, right) for _, left, right in merges],
                       unk_token=pieces[spec.unk_id].piece, fuse_unk=True, byte_fallback=spec.byte_fallback)
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1 if proto.normalizer_spec.add_dummy_prefix else 0, 0)])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (SentencePiece.CONTROL, SentencePiece.UNKNOWN)])
    if spec.bos_id >= 0:
        bos = pieces[spec.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return tok


def export_hf(native_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a Hugging Face ``LlamaForCausalLM`` folder that ``from_pretrained`` loads."""
    from .common import DTYPE_NAMES, read_native

    native = read_native(native_dir, dtype)
    args = native.args
    state = meta_to_hf_state(native.state_dict(), args)
    stored = next(iter(state.values())).dtype
    config = hf_config(args, native.special_ids, torch_dtype=DTYPE_NAMES.get(stored, "float32"))
    limit = parse_size(max_shard_size)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_safetensors(tmp, state, limit)
        if native.tokenizer_path is not None:
            write_hf_tokenizer(tmp, native.tokenizer_path, args.max_seq_len, native.chat_template)
        elif native.chat_template is not None:  # no tokenizer to configure: keep it as transformers' own file
            (tmp / CHAT_TEMPLATE_NAME).write_bytes(native.chat_template.encode("utf-8"))

    return atomic_write_dir(Path(out_dir), write, owned=HF_FILES, what="Hugging Face model folder")


def _hf_weight_files(folder: Path) -> list[Path]:
    for single, index in ((HF_WEIGHTS, HF_INDEX), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index, HF_LAYOUT).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index}: no \"weight_map\" object (tensor name -> file)")
            return [folder / f for f in dict.fromkeys(weight_map.values())]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no {HF_WEIGHTS}, {HF_INDEX} or pytorch_model.bin[.index.json]")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _open_hf_weights(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> loader of one tensor, so only one tensor at a time is read into memory."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        return {k: (lambda k=k: handle.get_tensor(k)) for k in handle.keys()}
    state = load_torch_tensors(path)
    return {k: (lambda v=v: v) for k, v in state.items()}


def _hf_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) without reading the data."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with naming_safetensors_errors(path), safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), _ST_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32))
                    for k in f.keys()}
    state = load_torch_tensors(path)
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def hf_chat_template(hf_dir: Path) -> str | None:
    """The chat template of an HF folder: ``chat_template.jinja`` (verbatim) if present, else
    ``tokenizer_config.json``'s ``chat_template``: a string, or a list of ``{"name", "template"}`` of which the
    one named "default" is kept (others, such as "tool_use", are dropped). None when there is none."""
    template = read_chat_template(hf_dir)
    cfg_path = hf_dir / "tokenizer_config.json"
    if template is not None or not cfg_path.is_file():
        return template
    value = read_json_object(cfg_path, HF_LAYOUT).get("chat_template")
    where = f"{cfg_path}: \"chat_template\""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        kind = {dict: "object", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")
        raise UserError(f"{where} is a JSON {kind}; expected a string or a list of "
                        "{\"name\": ..., \"template\": ...} objects")
    named = {}
    for i, item in enumerate(value):
        if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("name", "template"))):
            raise UserError(f"{where}[{i}] is {json.dumps(item)[:80]}; expected an object with string \"name\" "
                            "and \"template\"")
        named[item["name"]] = item["template"]
    if "default" not in named:
        print(f"note: {where} has no template named 'default' (only {sorted(named)}); "
              "the native folder will have no chat template")
    return named.get("default")


def import_hf(hf_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """A native folder from an HF ``LlamaForCausalLM`` folder (sharded or not, GQA, tied embeddings).

    The native dtype is ``dtype`` or else the stored one. Tensors are read one at a time. The chat template
    (``hf_chat_template``), if any, becomes the native folder's ``chat_template.jinja``.
    """
    from .common import parse_dtype, write_native

    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    cfg = read_json_object(cfg_path, HF_LAYOUT)
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in archs:
        raise ValueError(f"{cfg_path}: architectures {archs} is not LlamaForCausalLM")
    args, special = args_from_hf_config(cfg, str(cfg_path))
    chat_template = hf_chat_template(hf_dir)
    files = _hf_weight_files(hf_dir)
    shapes, dtypes = {}, []
    for f in files:
        for name, (shape, dt) in _hf_header(f).items():
            meta = hf_name_to_meta(name)
            if meta is not None:
                shapes[meta] = shape
                dtypes.append(dt)
    tied = "output.weight" not in shapes and "tok_embeddings.weight" in shapes
    if tied:
        shapes["output.weight"] = shapes["tok_embeddings.weight"]

    def tensors():
        for f in files:
            for name, load in _open_hf_weights(f).items():
                meta, tensor = hf_tensor_to_meta(name, load(), args)
                if meta is None:
                    continue
                yield meta, tensor
                if tied and meta == "tok_embeddings.weight":
                    yield "output.weight", tensor

    target = parse_dtype(dtype) or (dtypes[0] if dtypes else torch.float32)
    tok = hf_dir / "tokenizer.model"
    if not tok.is_file():
        print(f"note: {hf_dir} has no tokenizer.model (SentencePiece); the native folder will have no tokenizer")
        tok = None
    return write_native(out_dir, args, shapes, tensors, source=str(hf_dir), dtype=target, tokenizer_path=tok,
                        special_ids=None if tok else special, chat_template=chat_template)
