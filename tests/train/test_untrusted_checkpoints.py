"""Crafted checkpoints: a pickle that would run code, as a DCP ``.metadata`` or as a non-tensor entry, is refused
with the file named by ``llamalab convert``, ``llamalab train --resume`` and the loaders; real checkpoints load."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

import llamalab
from llamalab.checkpoint import load_model
from llamalab.cli import main
from llamalab.config import OptimizerConfig
from llamalab.model import build_model, preset_args
from llamalab.parallel.safe_dcp import UnsafeCheckpointError
from llamalab.train import checkpoint as ckpt
from llamalab.train.optim import build_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


class Touch:
    """Unpickled, creates ``marker`` (through ``Path.touch``, or ``os.system`` for the classic payload)."""

    def __init__(self, marker: pathlib.Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        return pathlib.Path.touch, (self.marker,)


REFUSED = {"Path.touch": "pathlib.Path.touch", "os.system": f"{os.system.__module__}.system"}


def live_payload(tmp_path, via: str) -> bytes:
    """A pickle of ``Touch(tmp_path/"ran", via)``, after checking that plain unpickling really runs it."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Touch(control, via)))
    assert control.exists()
    return pickle.dumps(Touch(tmp_path / "ran", via))


def complete(folder: pathlib.Path, model_args: dict | None = None) -> pathlib.Path:
    """Give a ``dcp/`` folder what a training checkpoint holds beside it, and a ``COMPLETE`` that matches."""
    json_rng, tensor_rng = ckpt.rng_state()
    (folder / "rank-0.json").write_text(json.dumps({"loader": None, "rng": json_rng}))
    torch.save(tensor_rng, folder / "rng-rank0.pt")
    state = {"step": 4, "tokens": 1024, **({"model_args": model_args} if model_args else {})}
    (folder / ckpt.STATE_NAME).write_text(json.dumps(state))
    (folder / ckpt.MARKER).unlink(missing_ok=True)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / ckpt.MARKER).write_text(json.dumps({"step": 4, "files": files}))
    ckpt.verify_checkpoint(folder)
    return folder


def tiny_model_and_optimizer(seed: int):
    model = build_model(preset_args("tiny"), seed=seed)
    return model, build_optimizer(model, OptimizerConfig())


@pytest.fixture
def real_checkpoint(tmp_path):
    """A training checkpoint of the tiny model after one AdamW step (so the optimizer has state)."""
    model, optimizer = tiny_model_and_optimizer(seed=0)
    model(torch.randint(0, preset_args("tiny").vocab_size, (2, 8))).float().square().mean().backward()
    optimizer.step()
    folder = tmp_path / "checkpoints" / "step-00000004"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / "dcp"), no_dist=True)
    return complete(folder, preset_args("tiny").to_dict()), model


def crafted_metadata(tmp_path, kind: str, via: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(folder to pass, its .metadata) for a bare DCP folder or a complete-looking training checkpoint."""
    folder = tmp_path / ("bare" if kind == "bare" else "crafted/checkpoints/step-00000004")
    dcp_dir = folder if kind == "bare" else folder / "dcp"
    dcp_dir.mkdir(parents=True)
    (dcp_dir / ".metadata").write_bytes(live_payload(tmp_path, via))
    (dcp_dir / "__0_0.distcp").write_bytes(b"")
    if kind == "step":
        complete(folder)
    return folder, dcp_dir / ".metadata"


def assert_refused_in_one_line(err: str, command: str, metadata: pathlib.Path, via: str) -> None:
    assert err.startswith(f"llamalab {command}: error: {metadata}: refusing to load '{REFUSED[via]}'"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("via", ["Path.touch", "os.system"])
@pytest.mark.parametrize("kind", ["bare", "step"])
def test_convert_refuses_a_metadata_payload(tmp_path, capsys, kind, via):
    folder, metadata = crafted_metadata(tmp_path, kind, via)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "native"]) != 0
    assert_refused_in_one_line(capsys.readouterr().err, "convert", metadata, via)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_train_resume_refuses_a_metadata_payload(tmp_path, prepared, capsys):
    folder, metadata = crafted_metadata(tmp_path, "step", "Path.touch")
    config = tmp_path / "run.toml"
    config.write_text("")
    overrides = ["--model.preset", "tiny", "--data.prepared", str(prepared), "--data.seq_len", "32",
                 "--batch.global_tokens", "256", "--batch.micro_batch", "4", "--run.out_dir", str(tmp_path / "run"),
                 "--logging.progress", "false", "--logging.tensorboard", "false", "--logging.plot", "false",
                 "--length.steps", "8", "--precision.mode", "fp32"]
    assert main(["train", str(config), *overrides, "--resume", str(folder)]) != 0
    assert_refused_in_one_line(capsys.readouterr().err, "train", metadata, "Path.touch")
    assert not (tmp_path / "ran").exists()


def test_load_reads_no_dcp_metadata(tmp_path):
    folder, _ = crafted_metadata(tmp_path, "bare", "Path.touch")
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        llamalab.load(folder)
    assert not (tmp_path / "ran").exists()


@pytest.fixture(params=["one process", "process group"])
def process_group(request):
    """Loads with and without a process group (then every rank's errors travel through ``all_gather_object``)."""
    if request.param == "process group":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        yield
        dist.destroy_process_group()
    else:
        yield


def test_resume_refuses_a_payload_in_a_non_tensor_entry(real_checkpoint, tmp_path, process_group):
    """Legitimate metadata, but the bytes of ``optimizer.param_groups.0.lr`` are a pickle that would run."""
    folder, _ = real_checkpoint
    dcp_dir = folder / "dcp"
    metadata = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    entry = "optimizer.param_groups.0.lr"
    index = next(i for i in metadata.storage_data if i.fqn == entry)
    info = metadata.storage_data[index]
    shard = dcp_dir / info.relative_path
    torch.save(Touch(tmp_path / "control", "Path.touch"), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control").exists()  # DCP's own planner would run it
    torch.save(Touch(tmp_path / "ran", "Path.touch"), tmp_path / "payload.pt")
    info.offset, info.length = shard.stat().st_size, (tmp_path / "payload.pt").stat().st_size
    with open(shard, "ab") as fh:
        fh.write((tmp_path / "payload.pt").read_bytes())
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    complete(folder)

    with pytest.raises(UnsafeCheckpointError, match=f"{dcp_dir}: refusing to load entry '{entry}': it would load"):
        ckpt.load_checkpoint(folder, *tiny_model_and_optimizer(seed=1))
    assert not (tmp_path / "ran").exists()


def test_real_checkpoint_resumes_and_converts(real_checkpoint, tmp_path):
    folder, saved = real_checkpoint
    model, optimizer = tiny_model_and_optimizer(seed=1)
    optimizer.param_groups[0]["lr"] = 0.5
    trainer_state, loader_state = ckpt.load_checkpoint(folder, model, optimizer)
    assert trainer_state["step"] == 4 and loader_state is None
    assert optimizer.param_groups[0]["lr"] == OptimizerConfig().lr  # a non-tensor entry, through weights_only
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values(), strict=True))
    assert len(optimizer.state) == len(list(model.parameters()))

    assert main(["convert", str(folder), str(tmp_path / "native"), "--to", "native"]) == 0
    converted, _, _ = load_model(tmp_path / "native")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), saved.state_dict().values(),
                                                   strict=True))


def test_unreadable_metadata_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / ".metadata").write_bytes(b"not a pickle")
    assert main(["convert", str(tmp_path / "bare"), str(tmp_path / "out"), "--to", "native"]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"llamalab convert: error: {tmp_path / 'bare' / '.metadata'}: unreadable distributed "
                          "checkpoint metadata") and err.count("\n") == 1
