"""Helpers the fine-tuning tests import by name (``conftest`` itself cannot be imported: every test folder has
one)."""

from __future__ import annotations

WORDS = ("red green blue apple river stone cloud quick slow bright happy garden water light sound music "
         "answer question number seven three paris london capital city animal tree").split()


def alpaca_records(n: int = 48) -> list[dict]:
    """Simple instruction/answer pairs a tiny model can start to learn (the answer is a word of the prompt)."""
    records = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        record = {"instruction": f"Repeat the first word: {a} {b}", "output": a}
        if i % 3 == 0:
            record["input"] = f"{b} comes second"
        records.append(record)
    return records


def finetune_overrides(base, data, out_dir, method: str = "lora") -> list[str]:
    """8 quiet fp32 steps of 4 examples (2 micro-batches of 2) on ``data``, a checkpoint every 4 steps."""
    return ["--finetune.base", str(base), "--finetune.data", str(data), "--finetune.method", method,
            "--finetune.validation_fraction", "0.2", "--data.seq_len", "64", "--data.val_batches", "4",
            "--batch.global_tokens", "256", "--batch.micro_batch", "2", "--length.steps", "8",
            "--schedule.warmup_steps", "2", "--optimizer.lr", "1e-2", "--run.out_dir", str(out_dir),
            "--logging.every", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
            "--logging.plot", "false", "--logging.peak_tflops", "1", "--checkpoint.every", "4",
            "--precision.mode", "fp32", "--lora.dropout", "0.1"]


def varied_records(n: int = 48) -> list[dict]:
    """Like ``alpaca_records`` but with answers of 1 to 5 words and prompts of three lengths, so rows (and the
    micro-batches of a layout) hold different numbers of response tokens, the ones that take loss."""
    records = []
    for i in range(n):
        words = [WORDS[(i + 2 * k) % len(WORDS)] for k in range(1 + (i * 7) % 5)]
        record = {"instruction": f"Repeat the words: {' '.join(words)}" + " please" * (i % 3), "output": " ".join(words)}
        if i % 4 == 1:
            record["input"] = WORDS[(5 * i) % len(WORDS)]
        records.append(record)
    return records
