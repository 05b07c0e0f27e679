"""A distributed checkpoint (DCP, any layout) as a native folder: the full model tensors read in one process.

Training checkpoints store the model through ``torch.distributed.checkpoint`` under the plain model's names
(``llamalab.parallel.checkpoint.state_module``), so one reader serves every layout; ``safe_dcp`` reads them
without unpickling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_state_into, read_config, save_pretrained
from ..model import ModelArgs, build_model
from ..parallel.safe_dcp import load_dcp_state, read_dcp_metadata


def _model_prefix(keys: list[str]) -> str:
    """The prefix under which a training checkpoint stores the model (``"model."`` or none)."""
    found = [key for key in keys if key.endswith("tok_embeddings.weight")]  # optimizer keys are longer
    if not found:
        raise ValueError("no 'tok_embeddings.weight' in the checkpoint: not a llamalab model checkpoint")
    return min(found, key=len)[: -len("tok_embeddings.weight")]


def read_model_state(dcp_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP checkpoint, under Meta's names, read in one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dcp_dir = Path(dcp_dir)
    if not (dcp_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{dcp_dir}: not a torch.distributed.checkpoint folder (no .metadata file)")
    metadata = read_dcp_metadata(dcp_dir)
    tensors = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    prefix = _model_prefix(sorted(tensors))
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in tensors.items() if k.startswith(prefix)
             and not k[len(prefix):].startswith(("state.", "param_groups."))}
    load_dcp_state(state, dcp_dir, no_dist=True)  # fills the tensors in place
    return {k[len(prefix):]: v for k, v in state.items()}


def export_native(dcp_dir: str | Path, out_dir: str | Path, *, args=None, tokenizer_path: str | Path | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write a single-process native checkpoint (``llamalab.checkpoint.save_pretrained``) from a DCP one.

    ``dcp_dir`` is a DCP folder or a training checkpoint folder (``step-N/``, holding ``dcp/``). The model shape
    comes from ``args`` (a ``ModelArgs``), else the training checkpoint's ``trainer_state.json``, else a native
    ``config.json`` beside the checkpoint; every tensor must be present with the model's shape. No process
    group or GPU is needed.
    """
    dcp_dir = Path(dcp_dir)
    if (dcp_dir / "dcp" / ".metadata").is_file():
        dcp_dir = dcp_dir / "dcp"
    state = read_model_state(dcp_dir)
    if args is None:
        trainer_state = dcp_dir.parent / "trainer_state.json"
        if trainer_state.is_file() and "model_args" in json.loads(trainer_state.read_text()):
            args = ModelArgs.from_dict(json.loads(trainer_state.read_text())["model_args"], source=str(trainer_state))
        elif (dcp_dir / "config.json").is_file():
            args, _ = read_config(dcp_dir)
        elif (dcp_dir.parent / "config.json").is_file():
            args, _ = read_config(dcp_dir.parent)
        else:
            raise FileNotFoundError(f"{dcp_dir}: no trainer_state.json or config.json beside it to give the model "
                                    "shape; pass args=")
    stored = next(iter(state.values())).dtype
    model = build_model(args, init=False, dtype=stored)
    load_state_into(model, state, str(dcp_dir))
    return save_pretrained(out_dir, model, tokenizer_path=tokenizer_path, dtype=dtype)
