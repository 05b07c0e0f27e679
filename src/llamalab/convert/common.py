"""Pieces every converter shares: dtype names, reading a native folder, streaming weights into a new one.

Importers build the model once (uninitialised, in the target dtype), check the incoming names and shapes
against it with ``llamalab.checkpoint.load_state_into`` on the meta device (no memory), then copy the
tensors in one at a time, so a large checkpoint is held in memory about once. The folder is written by
``llamalab.checkpoint.save_pretrained``, the one native writer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import (
    TOKENIZER_NAME,
    CorruptFileError,
    load_model,
    load_state_into,
    parse_dtype,
    read_chat_template,
    save_pretrained,
)
from ..model import ModelArgs, Transformer, build_model

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Native:
    """A loaded native folder: the model, its args, special ids, the tokenizer file and chat template (if any)."""

    model: Transformer
    args: ModelArgs
    special_ids: dict[str, int]
    tokenizer_path: Path | None
    chat_template: str | None = None  # the text of chat_template.jinja

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}


def read_native(folder: str | Path, dtype: str | torch.dtype | None = None) -> Native:
    folder = Path(folder)
    model, args, special = load_model(folder, dtype=parse_dtype(dtype))
    tok = folder / TOKENIZER_NAME
    return Native(model, args, special, tok if tok.is_file() else None, read_chat_template(folder))


def load_torch_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file (Meta's shards, ``pytorch_model.bin``), memory-mapped; never runs
    pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses any pickle that would run code; a cut file fails to unzip
        raise CorruptFileError(f"{path}: cannot be loaded as plain tensors with weights_only=True ({exc})") from None


def check_shapes(args: ModelArgs, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise the checkpoint module's error (missing/unexpected keys, shape mismatches) without any data."""
    with torch.device("meta"):
        model = Transformer(args)
        state = {k: torch.empty(s) for k, s in shapes.items()}
    load_state_into(model, state, source)


def write_native(out_dir: str | Path, args: ModelArgs, shapes: dict[str, tuple[int, ...]],
                 tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], *, source: str,
                 dtype: torch.dtype, tokenizer_path: str | Path | None = None,
                 special_ids: dict[str, int] | None = None, chat_template: str | None = None) -> Path:
    """Check ``shapes`` against ``args``, then copy each (name, tensor) of ``tensors()`` into a new model.

    ``tensors`` may yield a parameter in pieces as ``(name, (tensor, dim, offset))`` for sharded sources.
    """
    check_shapes(args, shapes, source)
    model = build_model(args, dtype=dtype, init=False)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for name, value in tensors():
            if isinstance(value, tuple):
                piece, dim, offset = value
                params[name].narrow(dim, offset, piece.shape[dim]).copy_(piece)
            else:
                params[name].copy_(value)
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{source}: no data for {missing[:10]}")
    model.eval()
    return save_pretrained(out_dir, model, tokenizer_path=tokenizer_path, special_ids=special_ids,
                           chat_template=chat_template)
