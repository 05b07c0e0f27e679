"""Helpers the training tests import by name (``conftest`` itself cannot be imported: every test folder has one)."""

from __future__ import annotations


def tiny_overrides(prepared, out_dir) -> list[str]:
    """``--section.key value`` pairs for the ``tiny`` model on the tiny data: 8 steps, quiet, fp32."""
    return ["--model.preset", "tiny", "--data.prepared", str(prepared), "--data.seq_len", "32",
            "--data.val_batches", "2", "--batch.global_tokens", "256", "--batch.micro_batch", "4",
            "--length.steps", "8", "--schedule.warmup_steps", "2", "--optimizer.lr", "3e-3",
            "--run.out_dir", str(out_dir), "--logging.every", "1", "--logging.progress", "false",
            "--logging.tensorboard", "false", "--logging.plot", "false", "--logging.peak_tflops", "1",
            "--checkpoint.every", "4", "--checkpoint.save_final", "false", "--precision.mode", "fp32"]
