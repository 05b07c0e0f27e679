"""Which checkpoint format a path holds, from its files and magic bytes (never from its name alone)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

FORMATS = ("native", "hf", "meta", "llama2c", "gguf", "dcp")


def detect_format(path: str | Path) -> str:
    """One of ``FORMATS``; a ValueError that says what was found when nothing matches."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / ".metadata").is_file() or (path / "dcp" / ".metadata").is_file():
            return "dcp"  # a torch.distributed.checkpoint folder, or a training checkpoint step-N/ holding one
        config = path / "config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{config}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            if "model_type" in data or "architectures" in data:
                return "hf"
            if "dim" in data and (path / "model.safetensors").is_file():
                return "native"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        names = sorted(p.name for p in path.iterdir())[:12]
        raise ValueError(f"{path}: cannot tell the checkpoint format from its files {names}; expected "
                         "config.json + model.safetensors (native or Hugging Face) or params.json + "
                         "consolidated.NN.pth (Meta); pass --from")
    with path.open("rb") as f:
        head = f.read(28)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"24ka":  # llama2.c version 1/2 magic; its importer explains what to do
        return "llama2c"
    if len(head) == 28:
        values = struct.unpack("<7i", head)
        if all(v > 0 for i, v in enumerate(values) if i != 5) and values[5] != 0:
            return "llama2c"
    raise ValueError(f"{path}: neither GGUF (magic 'GGUF') nor a llama2.c checkpoint (7-int header); pass --from")
