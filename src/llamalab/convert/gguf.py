"""GGUF (llama.cpp, Ollama) export with the ``gguf`` package's ``GGUFWriter``, and import with ``GGUFReader``.

llama.cpp's ``llama`` architecture rotates interleaved pairs like Meta (its ``convert_hf_to_gguf`` undoes HF's
q/k permutation), so Meta-layout weights go in unchanged. Tensors are named ``token_embd``, ``blk.N.attn_q``
... ``output``; numpy's (out, in) shape becomes ggml's (in, out). f16 and q8_0 keep the norm vectors in f32
(as llama.cpp's converter does); q8_0 falls back to f16 for a matrix whose rows are not a multiple of the
32-value block. The SentencePiece vocabulary goes in as ``tokenizer.ggml.*`` (tokens, scores, token types).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from ..checkpoint import CorruptFileError
from ..fs import atomic_file
from ..model import ModelArgs
from ..model.args import ffn_params_for_hidden
from .common import parse_dtype, read_native, write_native
from .spm import build_proto, load_proto

ARCH = "llama"
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight"}
_FROM_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_FROM_GGUF_TOP = {v: k for k, v in _TOP_NAMES.items()}
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def gguf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for parameter {name!r}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def meta_name(name: str) -> str | None:
    """Our name for a GGUF tensor; None for tensors llama.cpp derives (rope_freqs)."""
    if name in _FROM_GGUF_TOP:
        return _FROM_GGUF_TOP[name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _FROM_GGUF_LAYER:
        return f"layers.{m.group(1)}.{_FROM_GGUF_LAYER[m.group(2)]}"
    if name in ("rope_freqs.weight",):
        return None
    raise ValueError(f"unexpected GGUF tensor {name!r} (not a llama-architecture weight)")


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    data = t.detach().float().contiguous().numpy()
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16  # rows must hold whole 32-value blocks
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(native_dir: str | Path, out_path: str | Path, dtype: str = "f32", name: str | None = None) -> Path:
    """A GGUF file llama.cpp loads and runs: llama metadata, the SentencePiece vocabulary, the weights."""
    if dtype not in FILE_TYPES:
        raise ValueError(f"GGUF dtype {dtype!r} not supported; choose one of {sorted(FILE_TYPES)}")
    native = read_native(native_dir, torch.float32)
    if native.tokenizer_path is None:
        raise ValueError(f"{native_dir}: no tokenizer.model; llama.cpp cannot run a GGUF without a vocabulary")
    args = native.args
    file_type, qtype = FILE_TYPES[dtype]
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name or Path(native_dir).resolve().name)
        writer.add_file_type(file_type)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(args.vocab_size)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.ffn_hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.kv_heads)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_rope_freq_base(float(args.rope_theta))
        writer.add_layer_norm_rms_eps(float(args.norm_eps))
        add_tokenizer(writer, native.tokenizer_path)
        for pname, tensor in native.state_dict().items():
            data, kind = _encode(tensor, qtype)
            writer.add_tensor(gguf_name(pname), data, raw_dtype=kind if kind == gguf.GGMLQuantizationType.Q8_0 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


def add_tokenizer(writer: gguf.GGUFWriter, model_path: Path) -> None:
    proto = load_proto(model_path)
    spec = proto.trainer_spec
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])  # SentencePiece's and GGUF's enums agree
    for sid, add in ((spec.bos_id, writer.add_bos_token_id), (spec.eos_id, writer.add_eos_token_id),
                     (spec.unk_id, writer.add_unk_token_id), (spec.pad_id, writer.add_pad_token_id)):
        if sid >= 0:
            add(sid)
    writer.add_add_bos_token(spec.bos_id >= 0)
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------------------------------------------------
# Import


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_proto(reader: gguf.GGUFReader, source: str):
    """The SentencePiece ModelProto for a GGUF's ``tokenizer.ggml.*`` (``llama`` tokenizers only)."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') is supported")
    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(pieces)
    types = _field(reader, "tokenizer.ggml.token_type")
    return build_proto(pieces, [float(s) for s in scores], [int(t) for t in types] if types else None,
                       unk_id=_field(reader, "tokenizer.ggml.unknown_token_id", 0),
                       bos_id=_field(reader, "tokenizer.ggml.bos_token_id", 1),
                       eos_id=_field(reader, "tokenizer.ggml.eos_token_id", 2),
                       pad_id=_field(reader, "tokenizer.ggml.padding_token_id", -1))


def read_gguf_args(reader: gguf.GGUFReader, vocab_size: int, source: str) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"{source}: general.architecture is {arch!r}, not 'llama'")

    def need(key: str):
        value = _field(reader, f"{ARCH}.{key}")
        if value is None:
            raise ValueError(f"{source}: missing metadata {ARCH}.{key}")
        return value

    dim, hidden = need("embedding_length"), need("feed_forward_length")
    n_heads = need("attention.head_count")
    if _field(reader, f"{ARCH}.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise ValueError(f"{source}: rope.dimension_count != embedding_length / head_count (partial RoPE)")
    if _field(reader, f"{ARCH}.rope.scaling.type", "none") not in ("none",):
        raise ValueError(f"{source}: RoPE scaling is not supported")
    multiple_of, multiplier = ffn_params_for_hidden(dim, hidden)
    return ModelArgs(dim=dim, n_layers=need("block_count"), n_heads=n_heads,
                     n_kv_heads=_field(reader, f"{ARCH}.attention.head_count_kv", n_heads), vocab_size=vocab_size,
                     multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
                     norm_eps=need("attention.layer_norm_rms_epsilon"),
                     rope_theta=_field(reader, f"{ARCH}.rope.freq_base", 10000.0),
                     max_seq_len=_field(reader, f"{ARCH}.context_length", 2048))


def _decode(tensor) -> torch.Tensor:
    """A GGUF tensor as a float tensor in (out, in) order; quantized types go through gguf's dequantize."""
    kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = np.asarray(tensor.data)
    else:
        data = gguf.quants.dequantize(tensor.data, kind)
    return torch.from_numpy(np.array(data, copy=True).reshape(shape))


def import_gguf(path: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """A native folder from a llama-architecture GGUF (f32, f16, bf16 or q8_0 weights; tokenizer included).

    Default dtype: float32 for f32 files, float16 for f16 files (exact), float32 otherwise (dequantized).
    """
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError) as exc:  # gguf's own errors, or numpy's on a file cut short
        raise CorruptFileError(f"{path}: truncated or corrupt GGUF file ({exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor ({len(tensors)} tensors; a vocab-only file?)")
    vocab = int(tensors["token_embd.weight"].shape[-1])
    args = read_gguf_args(reader, vocab, str(path))
    shapes = {}
    for name, t in tensors.items():
        ours = meta_name(name)
        if ours is not None:
            shapes[ours] = tuple(int(n) for n in reversed(t.shape))
    tied = "output.weight" not in shapes
    if tied:  # llama.cpp's converters omit a classifier shared with the embedding
        shapes["output.weight"] = shapes["tok_embeddings.weight"]

    def stream():
        for name, t in tensors.items():
            ours = meta_name(name)
            if ours is None:
                continue
            value = _decode(t)
            yield ours, value
            if tied and ours == "tok_embeddings.weight":
                yield "output.weight", value

    kinds = {t.tensor_type for t in tensors.values() if len(t.shape) > 1}
    default = torch.float16 if kinds == {gguf.GGMLQuantizationType.F16} else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.model"
        tok.write_bytes(tokenizer_proto(reader, str(path)).SerializeToString())
        return write_native(out_dir, args, shapes, stream, source=str(path), dtype=parse_dtype(dtype) or default,
                            tokenizer_path=tok)
