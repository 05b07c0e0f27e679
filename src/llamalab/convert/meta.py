"""Meta's original checkpoints: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel rank.

Meta's fairscale layers split each matrix across ranks: column-parallel ``wq/wk/wv/w1/w3`` and ``output``
along the output dimension (rows, dim 0), row-parallel ``wo/w2`` along the input dimension (dim 1), the
parallel embedding along the embedding dimension (dim 1); norms are replicated. Names are ours already, and
the rotary layout is Meta's, so only the pieces are put back together. Shards are read one at a time with
``torch.load(weights_only=True, mmap=True)`` (no pickled code runs, nothing is read before it is copied) and
written straight into the new model, so peak memory stays near one copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..fs import atomic_write_dir, read_json_object
from ..model import ModelArgs
from .common import load_torch_tensors, parse_dtype, read_native, write_native

PARAMS = "params.json"
SKIPPED = {"rope.freqs"}  # LLaMA-1 stores the rotary frequencies; the model computes them
_SPLIT_DIMS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1,
    "tok_embeddings.weight": 1, "output.weight": 0,
}
_PARAM_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta")


def split_dim(name: str) -> int | None:
    """The dimension Meta split ``name`` along, or None when it is replicated (norms)."""
    key = re.sub(r"^layers\.\d+\.", "", name)
    return _SPLIT_DIMS.get(key)


def shard_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{folder}: no consolidated.NN.pth files (Meta's checkpoint layout)")
    numbers = [int(f.name.split(".")[1]) for f in files]
    if numbers != list(range(len(files))):
        raise ValueError(f"{folder}: shards {[f.name for f in files]} are not numbered 00..{len(files) - 1:02d}")
    return files


def read_params(folder: Path, vocab_from_weights: int, max_seq_len: int) -> ModelArgs:
    path = folder / PARAMS
    params = read_json_object(path, "a Meta checkpoint folder holds params.json and consolidated.NN.pth files")
    unknown = sorted(set(params) - set(_PARAM_FIELDS) - {"max_batch_size", "max_seq_len", "use_scaled_rope"})
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; expected some of {list(_PARAM_FIELDS)}")
    if params.get("use_scaled_rope"):
        raise ValueError(f"{path}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")
    fields = {k: params[k] for k in _PARAM_FIELDS if params.get(k) is not None}
    if fields.get("vocab_size", -1) <= 0:  # LLaMA-1 writes -1: the tokenizer decides
        fields["vocab_size"] = vocab_from_weights
    return ModelArgs(**fields, max_seq_len=params.get("max_seq_len", max_seq_len))


def import_meta(folder: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                tokenizer: str | Path | None = None, max_seq_len: int = 2048) -> Path:
    """A native folder from Meta's ``params.json`` + ``consolidated.NN.pth`` (N shards merged)."""
    folder = Path(folder)
    files = shard_files(folder)
    first = load_torch_tensors(files[0])
    first = {k: v for k, v in first.items() if k not in SKIPPED}
    n = len(files)
    shapes = {}
    for name, t in first.items():
        d = split_dim(name)
        shape = list(t.shape)
        if d is not None:
            shape[d] *= n
        shapes[name] = tuple(shape)
    vocab = shapes.get("tok_embeddings.weight", (0,))[0]
    args = read_params(folder, vocab, max_seq_len)
    stored = next(iter(first.values())).dtype
    del first

    def tensors():
        for i, path in enumerate(files):
            shard = {k: v for k, v in load_torch_tensors(path).items() if k not in SKIPPED}
            if i > 0:
                _check_same_layout(files[0], path, shapes, shard, n)
            for name, t in shard.items():
                d = split_dim(name)
                if d is None:
                    if i == 0:
                        yield name, t
                else:
                    yield name, (t, d, i * t.shape[d])
            del shard

    tok = Path(tokenizer) if tokenizer else next(
        (p / "tokenizer.model" for p in (folder, folder.parent) if (p / "tokenizer.model").is_file()), None)
    if tok is None:
        print(f"note: no tokenizer.model in {folder} or its parent; the native folder has none")
    return write_native(out_dir, args, shapes, tensors, source=str(folder), dtype=parse_dtype(dtype) or stored,
                        tokenizer_path=tok)


def _check_same_layout(first: Path, path: Path, shapes: dict, shard: dict, n: int) -> None:
    if set(shard) != set(shapes):
        diff = sorted(set(shard) ^ set(shapes))
        raise ValueError(f"{path}: keys differ from {first.name}: {diff[:10]}")
    for name, t in shard.items():
        d = split_dim(name)
        want = list(shapes[name])
        if d is not None:
            want[d] //= n
        if list(t.shape) != want:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, {first.name} implies {tuple(want)}")


def meta_params(args: ModelArgs) -> dict:
    """``params.json`` as Meta writes it (n_kv_heads only for grouped-query attention, like Llama 2)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.kv_heads != args.n_heads:
        params["n_kv_heads"] = args.kv_heads
    params.update(vocab_size=args.vocab_size, multiple_of=args.multiple_of, norm_eps=args.norm_eps,
                  rope_theta=args.rope_theta)
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    return params


def export_meta(native_dir: str | Path, out_dir: str | Path, shards: int = 1,
                dtype: str | torch.dtype | None = None) -> Path:
    """Meta's layout with ``shards`` model-parallel files, split as Meta's fairscale layers split them."""
    native = read_native(native_dir, dtype)
    args, state = native.args, native.state_dict()
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim,
             "ffn hidden dim": args.ffn_hidden_dim, "vocab_size": args.vocab_size}
    bad = {k: v for k, v in sizes.items() if shards < 1 or v % shards}
    if bad:
        raise ValueError(f"cannot split into {shards} model-parallel shards: {bad} not divisible by {shards}")

    def write(tmp: Path) -> None:
        (tmp / PARAMS).write_text(json.dumps(meta_params(args)) + "\n")
        for i in range(shards):
            shard = {}
            for name, t in state.items():
                d = split_dim(name)
                shard[name] = t.clone() if d is None else t.chunk(shards, dim=d)[i].clone()
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
            del shard
        if native.tokenizer_path is not None:
            (tmp / "tokenizer.model").write_bytes(native.tokenizer_path.read_bytes())

    return atomic_write_dir(Path(out_dir), write, owned=(PARAMS, "consolidated.*.pth", "tokenizer.model"),
                            what="Meta checkpoint folder")
