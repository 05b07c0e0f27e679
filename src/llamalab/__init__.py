"""llamalab: Meta's LLaMA reproduced end to end.

``llamalab.load(path)`` opens a native checkpoint folder (see ``llamalab.checkpoint``) and returns a
``Pretrained`` with ``.model``, ``.tokenizer`` and ``.generate(...)``. Names are imported lazily so that
commands which never touch a model (``llamalab data``, ``llamalab tokenizer``) start without importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "llamalab.api",
    "Pretrained": "llamalab.api",
    "ModelArgs": "llamalab.model",
    "Transformer": "llamalab.model",
    "build_model": "llamalab.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamalab' has no attribute {name!r}")


__all__ = sorted(_LAZY)
