"""The native model format: a folder with ``config.json``, ``model.safetensors`` and ``tokenizer.model``.

``config.json`` holds the ``ModelArgs`` fields under exactly those names plus the tokenizer's special ids;
``model.safetensors`` holds the weights under Meta's names. Nothing here unpickles: safetensors and JSON only.
Folders are written next to their final place and renamed into it, so a crash never leaves half a checkpoint
under the final name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .fs import atomic_write_dir, read_json_object
from .model import ModelArgs, Transformer, build_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # optional: the chat template (Jinja) of an imported HF checkpoint
SPECIAL_KEYS = ("bos_id", "eos_id", "pad_id", "unk_id")
# all a native folder holds: it may be replaced whole
NATIVE_FILES = (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME, CHAT_TEMPLATE_NAME)

DTYPES = {
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


NATIVE_LAYOUT = (f"a llamalab checkpoint is a folder holding {CONFIG_NAME}, {WEIGHTS_NAME} and {TOKENIZER_NAME} "
                 f"(and optionally {CHAT_TEMPLATE_NAME})")


class CorruptFileError(UserError, ValueError):
    """A weights file that cannot be parsed: cut short by a failed copy or download, or not that format at all."""


@contextmanager
def naming_safetensors_errors(path: Path) -> Iterator[None]:
    """Name ``path`` in safetensors' parse errors, which name no file."""
    try:
        yield
    except SafetensorError as exc:
        raise CorruptFileError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def read_config(folder: Path) -> tuple[ModelArgs, dict[str, int]]:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder; {NATIVE_LAYOUT}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: a file, not a folder; {NATIVE_LAYOUT}")
    path = folder / CONFIG_NAME
    data = read_json_object(path, NATIVE_LAYOUT)
    special = {k: data.pop(k) for k in SPECIAL_KEYS if k in data}
    return ModelArgs.from_dict(data, source=str(path)), special


def read_chat_template(folder: str | Path) -> str | None:
    """The text of ``chat_template.jinja`` in ``folder`` (verbatim), or None when there is none."""
    path = Path(folder) / CHAT_TEMPLATE_NAME
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); expected a Jinja chat template") from None


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous, unshared tensors under Meta's names (what safetensors requires)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_pretrained(folder: str | Path, model: Transformer, tokenizer_path: str | Path | None = None,
                    special_ids: dict[str, int] | None = None, dtype: torch.dtype | None = None,
                    force: bool = False, chat_template: str | None = None) -> Path:
    """Write a native folder; an existing folder is replaced only if it holds nothing but native files.

    ``chat_template`` (Jinja text) is written verbatim to ``chat_template.jinja``; when it is None, a
    ``chat_template.jinja`` beside ``tokenizer_path`` (a native folder's ``tokenizer.model``) is copied with it.
    """
    folder = Path(folder)
    if chat_template is None and tokenizer_path is not None and Path(tokenizer_path).name == TOKENIZER_NAME:
        chat_template = read_chat_template(Path(tokenizer_path).parent)
    if special_ids is None and tokenizer_path is not None:
        from .tokenizer import Tokenizer

        special_ids = Tokenizer(tokenizer_path).special_ids()
    config = {**model.args.to_dict(), **(special_ids or {})}
    state = model_state_dict(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "llamalab"})
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_NAME).write_bytes(chat_template.encode("utf-8"))

    size = sum(t.numel() * t.element_size() for t in state.values())
    return atomic_write_dir(folder, write, owned=NATIVE_FILES, what="native checkpoint folder", force=force,
                            size_hint=size)


def load_state_into(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking that names and shapes match exactly."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {tuple(state[k].shape)} != model {tuple(expected[k])}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:10]}")
        raise ValueError(f"{source}: weights do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model, args, special_ids) from a native folder, in ``dtype`` (default: the stored dtype)."""
    folder = Path(folder)
    args, special = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; {NATIVE_LAYOUT}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # a CPU-only torch asserts on "cuda"
        raise UserError(f"device {str(device)!r} is not usable here ({exc})") from None
    with naming_safetensors_errors(weights):
        state = load_file(str(weights), device=str(device))
    stored = next(iter(state.values())).dtype if state else torch.float32
    model = build_model(args, device=device, dtype=dtype or stored, init=False)
    load_state_into(model, state, str(weights))
    model.eval()
    return model, args, special
