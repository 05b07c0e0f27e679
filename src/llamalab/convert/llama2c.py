"""llama2.c's legacy (version 0) ``.bin`` checkpoints and its ``tok*.bin`` tokenizer files.

``.bin``: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then
float32 arrays in Meta's layout (interleaved rotary pairs, no permutation): tok_embeddings, rms_att, wq, wk,
wv, wo, rms_ffn, w1, w2, w3 (each stacked over layers), rms_final, the RoPE tables freq_cis_real/imag
(skipped: we compute them), and ``wcls`` only when vocab_size is negative (an untied classifier).

``tok*.bin``: uint32 max_token_length, then per id float32 score, uint32 length, UTF-8 bytes, with spaces
for "▁" and ids 1/2 stored as "\\n<s>\\n"/"\\n</s>\\n" (llama2.c's ``tokenizer.py export``).
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..fs import atomic_file
from ..model import ModelArgs
from ..model.args import ffn_params_for_hidden
from .common import parse_dtype, read_native, write_native
from .spm import build_proto, load_proto

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's version 1/2 exports, which this reader does not handle
NORM_EPS = 1e-5  # llama2.c hard-codes RMSNorm's epsilon
_STORED_SPECIAL = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}


def _layer_arrays(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """(Meta name pattern, per-layer shape) in file order, between the embedding and the final norm."""
    d, h, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    return [("attention_norm.weight", (d,)), ("attention.wq.weight", (d, d)), ("attention.wk.weight", (kv, d)),
            ("attention.wv.weight", (kv, d)), ("attention.wo.weight", (d, d)), ("ffn_norm.weight", (d,)),
            ("feed_forward.w1.weight", (h, d)), ("feed_forward.w2.weight", (d, h)),
            ("feed_forward.w3.weight", (h, d))]


def read_header(path: Path) -> tuple[ModelArgs, bool]:
    """(ModelArgs, shared_classifier) from a legacy ``.bin``; clear errors for other files. Reads the 28 header
    bytes only: checkpoints run to gigabytes."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for llama2.c's 28-byte header")
    if struct.unpack("<I", raw[:4])[0] == VERSIONED_MAGIC:
        raise ValueError(f"{path}: a llama2.c version 1/2 export (magic 'ak42'); re-export it with "
                         "`export.py --version 0` (the legacy format) to convert it")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0:
        raise ValueError(f"{path}: not a llama2.c checkpoint: header (dim, hidden_dim, n_layers, n_heads, "
                         f"n_kv_heads, vocab_size, seq_len) = {(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)}")
    multiple_of, multiplier = ffn_params_for_hidden(dim, hidden)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
                     multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=NORM_EPS,
                     max_seq_len=seq_len)
    if args.ffn_hidden_dim != hidden:
        raise ValueError(f"{path}: hidden_dim {hidden} cannot be represented by ModelArgs")
    return args, vocab > 0


def read_llama2c(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and Meta-named float32 tensors (views of a copy-on-write memory map) of a legacy ``.bin``."""
    path = Path(path)
    args, shared = read_header(path)
    d, L, vocab = args.dim, args.n_layers, args.vocab_size
    rope = 2 * args.max_seq_len * args.head_dim // 2
    layer = _layer_arrays(args)
    count = vocab * d + L * sum(int(np.prod(s)) for _, s in layer) + d + rope + (0 if shared else vocab * d)
    have = path.stat().st_size - HEADER.size
    if have != count * 4:
        problem = "the file is truncated" if have < count * 4 else "the file is longer than its header says"
        raise ValueError(f"{path}: {have} bytes of weights, expected {count * 4} for the header's shapes "
                         f"({'tied' if shared else 'untied'} classifier); {problem}")
    data = torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=HEADER.size))
    state: dict[str, torch.Tensor] = {}
    pos = 0

    def take(shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal pos
        n = int(np.prod(shape))
        out = data[pos: pos + n].view(shape)
        pos += n
        return out

    state["tok_embeddings.weight"] = take((vocab, d))
    for name, shape in layer:
        stacked = take((L, *shape))
        for i in range(L):
            state[f"layers.{i}.{name}"] = stacked[i]
    state["norm.weight"] = take((d,))
    take((rope,))  # freq_cis_real and freq_cis_imag: derived from rope_theta, recomputed by the model
    state["output.weight"] = state["tok_embeddings.weight"] if shared else take((vocab, d))
    return args, state


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files


def read_tokenizer_bin(path: str | Path, vocab_size: int) -> tuple[list[str], list[float]]:
    """Pieces (with "▁" for spaces, ``<s>``/``</s>`` restored) and scores of a llama2.c ``tok*.bin``."""
    raw = Path(path).read_bytes()
    pieces, scores, pos = [], [], 4
    for i in range(vocab_size):
        if pos + 8 > len(raw):
            raise ValueError(f"{path}: ends at token {i}; the model's vocabulary has {vocab_size} tokens")
        score, length = struct.unpack_from("<fI", raw, pos)
        text = raw[pos + 8: pos + 8 + length].decode("utf-8", errors="strict")
        pos += 8 + length
        pieces.append(_STORED_SPECIAL.get(text, text.replace(" ", "\u2581")))
        scores.append(score)
    if pos != len(raw):
        raise ValueError(f"{path}: {len(raw) - pos} bytes left after {vocab_size} tokens; wrong tokenizer?")
    return pieces, scores


def tokenizer_bin_to_model(path: str | Path, vocab_size: int) -> bytes:
    """A SentencePiece ``tokenizer.model`` (serialised) equivalent to a llama2.c ``tok*.bin``."""
    pieces, scores = read_tokenizer_bin(path, vocab_size)
    return build_proto(pieces, scores).SerializeToString()


def write_tokenizer_bin(model_path: str | Path, out_path: str | Path) -> Path:
    """llama2.c's ``tokenizer.py export`` of a SentencePiece model."""
    proto = load_proto(model_path)
    spec = proto.trainer_spec
    tokens = []
    for i, p in enumerate(proto.pieces):
        text = {spec.bos_id: "\n<s>\n", spec.eos_id: "\n</s>\n"}.get(i, p.piece)
        tokens.append((p.score, text.replace("\u2581", " ").encode("utf-8")))
    out = bytearray(struct.pack("<I", max(len(b) for _, b in tokens)))
    for score, b in tokens:
        out += struct.pack("<fI", score, len(b)) + b
    Path(out_path).write_bytes(bytes(out))
    return Path(out_path)


def find_tokenizer(bin_path: Path, vocab_size: int) -> Path | None:
    for name in (f"tok{vocab_size}.bin", f"tok{vocab_size}.model", "tokenizer.model", "tokenizer.bin"):
        if (bin_path.parent / name).is_file():
            return bin_path.parent / name
    return None


# ---------------------------------------------------------------------------------------------------------
# Import and export


def import_llama2c(bin_path: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
                   dtype: str | torch.dtype | None = None) -> Path:
    """A native folder from a legacy llama2.c ``.bin`` and its tokenizer (``tok*.bin`` or a SentencePiece
    ``.model``; looked for next to the ``.bin`` when not given)."""
    bin_path = Path(bin_path)
    args, state = read_llama2c(bin_path)
    tok = Path(tokenizer) if tokenizer is not None else find_tokenizer(bin_path, args.vocab_size)
    if tok is None:
        print(f"note: no tokenizer given or found next to {bin_path}; the native folder has none")
    with tempfile.TemporaryDirectory() as tmp:
        if tok is not None and tok.suffix == ".bin":
            model_file = Path(tmp) / "tokenizer.model"
            model_file.write_bytes(tokenizer_bin_to_model(tok, args.vocab_size))
            tok = model_file
        return write_native(out_dir, args, {k: tuple(v.shape) for k, v in state.items()}, state.items,
                            source=str(bin_path), dtype=parse_dtype(dtype) or torch.float32, tokenizer_path=tok)


def export_llama2c(native_dir: str | Path, out_path: str | Path, tokenizer_out: str | Path | None = None) -> Path:
    """Write a legacy llama2.c ``.bin`` (float32) and, when the folder has a tokenizer, its ``tok{N}.bin``
    next to it (or at ``tokenizer_out``)."""
    native = read_native(native_dir, torch.float32)
    args, state = native.args, native.state_dict()
    if args.norm_eps != NORM_EPS or args.rope_theta != 10000.0:
        print(f"warning: llama2.c hard-codes norm_eps 1e-5 and rope_theta 10000; this model has "
              f"{args.norm_eps} and {args.rope_theta}, which the .bin cannot record")
    shared = torch.equal(state["tok_embeddings.weight"], state["output.weight"])
    header = HEADER.pack(args.dim, args.ffn_hidden_dim, args.n_layers, args.n_heads, args.kv_heads,
                         args.vocab_size if shared else -args.vocab_size, args.max_seq_len)
    L = args.n_layers
    arrays = [state["tok_embeddings.weight"]]
    arrays += [torch.stack([state[f"layers.{i}.{name}"] for i in range(L)]) for name, _ in _layer_arrays(args)]
    arrays += [state["norm.weight"], native.model.rope_cos, native.model.rope_sin]
    if not shared:
        arrays.append(state["output.weight"])
    out_path = Path(out_path)

    with atomic_file(out_path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for a in arrays:
            f.write(a.detach().float().contiguous().numpy().astype("<f4").tobytes())
    if native.tokenizer_path is not None:
        tok_out = Path(tokenizer_out) if tokenizer_out else out_path.with_name(f"tok{args.vocab_size}.bin")
        with atomic_file(tok_out) as tmp:
            write_tokenizer_bin(native.tokenizer_path, tmp)
    return out_path
