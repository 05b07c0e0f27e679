"""Reading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

DCP's own reader unpickles ``.metadata`` with plain ``pickle`` and the planner unpickles every non-tensor entry
(optimizer ``param_groups`` values, ...) with ``torch.load(weights_only=False)``, so a crafted checkpoint runs
whatever its pickles name. Here ``.metadata`` goes through an unpickler that knows only the classes DCP writes
into it, and non-tensor entries through ``torch.load(weights_only=True)``; tensors were already read that way.
Anything else is an ``UnsafeCheckpointError`` naming the file and what it tried to load.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem

from ..errors import UserError

# Every global a DCP ``.metadata`` names, found by recording what unpickling the metadata of one-process,
# FSDP, TP, DDP and pipeline checkpoints (model and optimizer, fp32 and bf16) looks up.
_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # name -> one of torch's layouts
    ("pathlib", "PosixPath"): pathlib.PosixPath,  # StorageMeta.checkpoint_id, the folder it was saved to
    ("pathlib._local", "PosixPath"): pathlib.PosixPath,  # the same, as Python 3.13 pickles it
}


class UnsafeCheckpointError(UserError):
    """A checkpoint file names code or objects that a checkpoint never holds; nothing of it was run."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_METADATA_GLOBALS``, so unpickling builds data and calls nothing else."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _METADATA_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to load '{module}.{name}': a distributed checkpoint's metadata holds "
                "only tensor and storage descriptions") from None


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor entries are unpickled with ``weights_only=True``."""

    def __init__(self, source: Path):
        super().__init__()
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"it would load '{found.group(1)}'" if found else "it is not plain data"
            raise UnsafeCheckpointError(f"{self.source}: refusing to load entry '{fqn}': {what}; a checkpoint's "
                                        "non-tensor entries hold only numbers, strings and containers") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` that never unpickles code: see the module docstring.

    Use it through ``read_dcp_metadata`` and ``load_dcp_state``, which pair it with the weights-only planner.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        with open(path, "rb") as fh:
            try:
                metadata = _MetadataUnpickler(fh, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as exc:  # whatever a truncated or foreign file makes the unpickler raise
                raise UserError(f"{path}: unreadable distributed checkpoint metadata ({exc!r})") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{path}: holds a {type(metadata).__name__}, not distributed checkpoint metadata")
        for info in (metadata.storage_data or {}).values():  # DCP opens these files: keep them in the folder
            relative = Path(getattr(info, "relative_path", ""))
            if relative.is_absolute() or ".." in relative.parts:
                raise UnsafeCheckpointError(f"{path}: names a data file outside its folder ({relative})")
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        if not isinstance(planner, _WeightsOnlyLoadPlanner):  # DCP's default planner unpickles entries fully
            raise TypeError("SafeFileSystemReader needs load_dcp_state's planner")
        return super().read_data(plan, planner)


def read_dcp_metadata(dcp_dir: str | Path) -> Metadata:
    """The metadata of the DCP folder ``dcp_dir`` (names, shapes, dtypes of what it stores), read safely."""
    return SafeFileSystemReader(dcp_dir).read_metadata()


def load_dcp_state(state_dict: dict, dcp_dir: str | Path, *, no_dist: bool = False) -> None:
    """``dcp.load(state_dict)`` from ``dcp_dir`` without unpickling code; fills ``state_dict`` in place.

    A refusal surfaces as itself: the metadata is read once up front (inside ``dcp.load`` a failed read is
    logged and replaced by an AssertionError), and a refused entry is taken back out of the
    ``CheckpointException`` in which ``dcp.load`` gathers every rank's errors.
    """
    dcp_dir = Path(dcp_dir)
    reader = SafeFileSystemReader(dcp_dir)
    reader.read_metadata()
    try:
        with warnings.catch_warnings():  # loading in one process, without a process group, is intended
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state_dict, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(dcp_dir), no_dist=no_dist)
    except CheckpointException as exc:
        refused = [error for error, _ in exc.failures.values() if isinstance(error, UserError)]
        if refused:
            raise refused[0] from None
        raise
