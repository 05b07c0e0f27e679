"""Checkpoint safety: a corrupt or truncated newest checkpoint is skipped, a failed write changes nothing,
non-finite losses are skipped and counted, and a diverging run stops with a usable checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llamalab.config import OptimizerConfig
from llamalab.model import build_model, preset_args
from llamalab.train import checkpoint as ckpt
from llamalab.train import trainer
from llamalab.train.metrics import read_metrics
from llamalab.train.optim import build_optimizer


def checkpoints(cfg) -> list[str]:
    return [p.name for _, p in ckpt.list_checkpoints(Path(cfg.run.out_dir) / "checkpoints")]


def _save_two(root):
    model = build_model(preset_args("tiny"), seed=0)
    optimizer = build_optimizer(model, OptimizerConfig())
    for step in (4, 8):
        ckpt.save_checkpoint(root, step, model, optimizer, {"step": step, "tokens": step}, {"step": step})
    return root / "step-00000004", root / "step-00000008"


def _damage(folder, damage: str) -> None:
    shard = next((folder / "dcp").glob("*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "no_marker":
        (folder / ckpt.MARKER).unlink()
    else:
        (folder / "rank-0.json").unlink()


@pytest.mark.parametrize("damage, reason", [("truncate", "truncated"), ("flip", "corrupt (SHA-256 mismatch)"),
                                            ("no_marker", "no COMPLETE marker"), ("missing", "is missing")])
def test_damaged_newest_checkpoint_is_skipped_with_a_message(tmp_path, damage, reason):
    older, newest = _save_two(tmp_path)
    _damage(newest, damage)
    messages = []
    assert ckpt.find_resumable(tmp_path, log=messages.append) == [older]
    assert len(messages) == 1 and messages[0].startswith("skipping checkpoint step-00000008") and reason in messages[0]


@pytest.mark.slow
def test_resume_auto_falls_back_to_the_previous_checkpoint(make_config, capsys):
    cfg = make_config("--checkpoint.every", "4")
    trainer.train(cfg)
    assert checkpoints(cfg) == ["step-00000008", "step-00000004"]
    _damage(Path(cfg.run.out_dir) / "checkpoints" / "step-00000008", "truncate")
    capsys.readouterr()
    result = trainer.train(make_config("--checkpoint.every", "4", "--checkpoint.resume", "auto"))
    err = capsys.readouterr().err
    assert "skipping checkpoint step-00000008" in err and "truncated" in err
    assert "resumed from" in err and "(step 4," in err
    assert result.steps == 8  # trained steps 5..8 again from the step-4 checkpoint
    assert checkpoints(cfg) == ["step-00000008", "step-00000004"]  # the damaged one was replaced


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = build_model(preset_args("tiny"), seed=0)
    optimizer = build_optimizer(model, OptimizerConfig())
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, 4, model, optimizer, {"step": 4, "tokens": 1}, {"loader": 1})
    before = {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    real_save = ckpt.dcp.save

    def dies_mid_write(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shard files are on disk...
        raise OSError("disk full")  # ...then the write fails before the checkpoint is finished

    monkeypatch.setattr(ckpt.dcp, "save", dies_mid_write)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(root, 8, model, optimizer, {"step": 8, "tokens": 2}, {"loader": 2})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # no half-written folder left
    assert {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert ckpt.find_resumable(root) == [good]
    fresh = build_model(preset_args("tiny"), seed=1)
    state, loader_state = ckpt.load_checkpoint(good, fresh, build_optimizer(fresh, OptimizerConfig()))
    assert state["step"] == 4 and loader_state == {"loader": 1}
    reference = build_model(preset_args("tiny"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference.parameters()))


def test_keeps_only_the_newest_k(tmp_path):
    model = build_model(preset_args("tiny"), seed=0)
    optimizer = build_optimizer(model, OptimizerConfig())
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, None, keep=2)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000003"]


def _nan_at(monkeypatch, bad_steps: set[int], accum: int):
    """Make the loss NaN on the micro-batches of the given (1-based) optimizer steps."""
    real = trainer.cross_entropy_loss
    calls = {"n": 0}

    def loss(logits, targets):
        step = calls["n"] // accum + 1
        calls["n"] += 1
        value = real(logits, targets)
        return value * float("nan") if step in bad_steps else value

    monkeypatch.setattr(trainer, "cross_entropy_loss", loss)


@pytest.mark.slow
def test_nan_loss_is_skipped_and_counted(make_config, monkeypatch):
    _nan_at(monkeypatch, {3}, accum=2)
    records = []
    result = trainer.train(make_config("--length.steps", "5"), on_step=lambda s, r: records.append(r))
    assert result.skipped_steps == 1 and result.steps == 5
    assert records[2]["loss"] is None and records[2]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert math.isfinite(result.val_loss)


@pytest.mark.slow
def test_nan_in_a_row_stops_with_a_usable_checkpoint(make_config, monkeypatch):
    _nan_at(monkeypatch, {4, 5, 6, 7, 8}, accum=2)
    cfg = make_config("--run.max_bad_steps", "3", "--checkpoint.every", "2")
    with pytest.raises(trainer.TrainingDiverged, match=r"3 non-finite losses in a row \(steps 4-6\).*step-00000006"):
        trainer.train(cfg)
    root = Path(cfg.run.out_dir) / "checkpoints"
    newest = ckpt.find_resumable(root)[0]
    assert newest.name == "step-00000006"
    weights = {}
    for name in ("step-00000004", "step-00000006"):  # both hold the weights after step 3, the last good one
        model = build_model(cfg.model_args(vocab_size=256), seed=5)
        ckpt.load_checkpoint(root / name, model, build_optimizer(model, OptimizerConfig()))
        weights[name] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in weights["step-00000006"])
    assert all(torch.equal(a, b) for a, b in zip(weights["step-00000004"], weights["step-00000006"]))
    train_records = [r for r in read_metrics(Path(cfg.run.out_dir) / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train_records] == [0, 0, 0, 1, 2, 3]
