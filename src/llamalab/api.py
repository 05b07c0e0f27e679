"""``llamalab.load`` and the ``Pretrained`` bundle it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .inference.backend import Backend, accelerate
from .model import ModelArgs, Transformer


@dataclass
class Pretrained:
    model: Transformer
    args: ModelArgs
    tokenizer: object | None  # llamalab.tokenizer.Tokenizer when the folder holds tokenizer.model
    special_ids: dict[str, int]
    path: Path
    chat_template: str | None = None  # the folder's chat_template.jinja (an imported HF checkpoint's), verbatim
    backends: dict[bool, Backend] = field(default_factory=dict, repr=False)  # by ``compile``

    def accelerate(self, compile: bool = False) -> Backend:
        """The model's inference backend (``llamalab.inference.backend.accelerate``), built on first use: it keeps
        the Decoders, so a compiled step compiles once per shape for this bundle."""
        backend = self.backends.get(compile)
        if backend is None or backend.model is not self.model:
            backend = self.backends[compile] = accelerate(self.model, compile=compile)
        return backend

    def generate(self, prompts, *, compile: bool = False, **kwargs):
        """Generate from a prompt string (or a list of them); ``compile`` compiles the decode step; see
        ``llamalab.generate.generate`` for the rest."""
        from .generate import generate

        return generate(self.accelerate(compile), self.tokenizer, prompts, **kwargs)


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> Pretrained:
    """Load a native llamalab checkpoint folder. Never unpickles: safetensors and JSON only."""
    from .checkpoint import TOKENIZER_NAME, load_model, parse_dtype, read_chat_template
    from .tokenizer import Tokenizer

    path = Path(path)
    model, args, special = load_model(path, dtype=parse_dtype(dtype), device=device)
    tok_path = path / TOKENIZER_NAME
    tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
    if tokenizer is not None:
        special = {**tokenizer.special_ids(), **special}
    return Pretrained(model=model, args=args, tokenizer=tokenizer, special_ids=special, path=path,
                      chat_template=read_chat_template(path))

