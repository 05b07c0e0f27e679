"""``llamalab.load`` and the ``Pretrained`` bundle it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .model import ModelArgs, Transformer


@dataclass
class Pretrained:
    model: Transformer
    args: ModelArgs
    tokenizer: object | None  # llamalab.tokenizer.Tokenizer when the folder holds tokenizer.model
    special_ids: dict[str, int]
    path: Path

    def generate(self, prompts, **kwargs):
        """Generate from a prompt string (or a list of them); see ``llamalab.generate.generate``."""
        from .generate import generate

        return generate(self.model, self.tokenizer, prompts, **kwargs)


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Pretrained:
    """Load a native llamalab checkpoint folder. Never unpickles: safetensors and JSON only."""
    from .checkpoint import TOKENIZER_NAME, load_model, parse_dtype
    from .tokenizer import Tokenizer

    path = Path(path)
    model, args, special = load_model(path, dtype=parse_dtype(dtype), device=device)
    tok_path = path / TOKENIZER_NAME
    tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
    if tokenizer is not None:
        special = {**tokenizer.special_ids(), **special}
    return Pretrained(model=model, args=args, tokenizer=tokenizer, special_ids=special, path=path)

