"""Training checkpoints: model + optimizer through ``torch.distributed.checkpoint``, the rest as JSON.

Layout of ``<out_dir>/checkpoints/step-00001000/``::

    dcp/                 model and optimizer (DCP: one layout for one process, FSDP or TP; reshardable)
    trainer_state.json   step, tokens seen, schedule, config, counters (rank 0)
    rank-<r>.json        per-rank data loader state, Python and NumPy RNG states
    rng-rank<r>.pt       per-rank torch (and CUDA) RNG states (``torch.load(weights_only=True)``)
    COMPLETE             written last: size and SHA-256 of every file above

A checkpoint is written into ``.tmp-step-…``, every file fsynced, ``COMPLETE`` added, then the folder is renamed
into place, so a crash leaves either the old set of checkpoints or the new one. Loading checks ``COMPLETE``
against the files and skips (with a message) a checkpoint that is incomplete, truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import DiskFullError, UserError, disk_full_error, is_disk_full
from ..fs import folder_bytes, fsync_dir
from ..parallel.safe_dcp import load_dcp_state

MARKER = "COMPLETE"
STATE_NAME = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder is incomplete, truncated or corrupt."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_json(path: Path, data) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> tuple[dict, dict]:
    """(JSON-able Python/NumPy states, tensor states for torch.save) of this process."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    json_part = {"python": [py_version, list(py_internal), py_gauss],
                 "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensor_part = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensor_part["cuda"] = torch.cuda.get_rng_state()
    return json_part, tensor_part


def set_rng_state(json_part: dict, tensor_part: dict) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor_part["torch"])
    if "cuda" in tensor_part and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor_part["cuda"])


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every ``step-N`` folder under ``root``, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def verify_checkpoint(folder: Path) -> dict:
    """The parsed ``COMPLETE`` record after checking every listed file's size and hash; else CheckpointError."""
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder}: no {MARKER} marker (the write did not finish)")
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: unreadable {MARKER} marker ({exc})") from None
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: file {rel} is missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{folder}: file {rel} is truncated or altered ({size} bytes, expected {meta['size']})")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{folder}: file {rel} is corrupt (SHA-256 mismatch)")
    return record


def save_checkpoint(root: Path, step: int, model, optimizer, trainer_state: dict, loader_state: dict | None,
                    *, rank: int = 0, keep: int = 3) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep`` complete ones.

    Every rank calls this (DCP writes each rank's shards); rank 0 finalises and renames.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a writer that was killed; one run writes here at a time
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        json_rng, tensor_rng = rng_state()
        _write_json(tmp / f"rank-{rank}.json", {"loader": loader_state, "rng": json_rng})
        torch.save(tensor_rng, tmp / f"rng-rank{rank}.pt")
        _fsync_file(tmp / f"rng-rank{rank}.pt")
        _barrier()
        if rank == 0:
            _write_json(tmp / STATE_NAME, trainer_state)
            files = {}
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    _fsync_file(path)
                    files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
            for sub in [tmp / "dcp", tmp]:
                fsync_dir(sub)
            _write_json(tmp / MARKER, {"step": step, "files": files})
            fsync_dir(tmp)
            if final.exists():  # a stale folder of the same step (an earlier, abandoned run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            prune_checkpoints(root, keep)
    except BaseException as exc:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise _disk_full(root, model, exc) from exc
        raise
    _barrier()
    return final


def _disk_full(root: Path, model, exc: BaseException) -> DiskFullError:
    """The error for a checkpoint that did not fit: the space it needs and the checkpoint still intact."""
    previous = next((folder for _, folder in list_checkpoints(root) if (folder / MARKER).is_file()), None)
    if previous is not None:
        needed = folder_bytes(previous)
    else:  # weights and AdamW's two moments
        needed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    err = disk_full_error(root, needed, exc)
    intact = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    return DiskFullError(err.errno, f"{err.strerror}; {intact}")


def check_model_args(folder: Path, expected: dict) -> None:
    """A CheckpointError naming every model setting that differs between the checkpoint and this run."""
    path = Path(folder) / STATE_NAME
    try:
        saved = json.loads(path.read_text()).get("model_args")
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if saved is None:
        return
    changed = [f"{k}={saved.get(k)!r} in the checkpoint, {expected.get(k)!r} now"
               for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
    if changed:
        raise CheckpointError(f"{folder}: saved for another model ({'; '.join(changed)}); resume with the "
                              "checkpoint's model settings, or train into a new run.out_dir")


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (incomplete ones older than those too)."""
    complete = 0
    for _, folder in list_checkpoints(root):
        if complete >= keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif (folder / MARKER).is_file():
            complete += 1


def load_checkpoint(folder: Path, model, optimizer, *, rank: int = 0) -> tuple[dict, dict | None]:
    """Restore model, optimizer and RNG states from ``folder``; returns (trainer_state, this rank's loader state)."""
    folder = Path(folder)
    verify_checkpoint(folder)
    rank_file = folder / f"rank-{rank}.json"
    if not rank_file.is_file() and (folder / "rank-0.json").is_file():
        # Resuming with more processes (another parallel layout): the loader state counts global batches and is
        # the same on every rank, so rank 0's serves; so do its RNG states (nothing in training draws from them).
        rank = 0
        rank_file = folder / "rank-0.json"
    if not rank_file.is_file():
        raise CheckpointError(f"{folder}: no state for rank {rank} (saved with fewer processes?)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    load_dcp_state(state, folder / "dcp")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    per_rank = json.loads(rank_file.read_text())
    tensor_rng = torch.load(folder / f"rng-rank{rank}.pt", weights_only=True)
    set_rng_state(per_rank["rng"], tensor_rng)
    trainer_state = json.loads((folder / STATE_NAME).read_text())
    return trainer_state, per_rank["loader"]


def find_resumable(root: Path, log=None) -> list[Path]:
    """Complete, intact checkpoints under ``root``, newest first; each skipped one is reported through ``log``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    good = []
    for _, folder in list_checkpoints(root):
        try:
            verify_checkpoint(folder)
        except CheckpointError as exc:
            log(f"skipping checkpoint {folder.name}: {exc}")
            continue
        good.append(folder)
    return good
