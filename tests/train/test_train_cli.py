"""``llamalab train`` end to end on the tiny data: exit codes, what it prints and the files it writes."""

from __future__ import annotations

import json
import time

import pytest

from llamalab.commands import train as train_cmd
from llamalab.train import trainer


def _write_config(tmp_path, prepared) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
[run]
out_dir = "{tmp_path / 'run'}"
[model]
preset = "tiny"
[data]
prepared = "{prepared}"
seq_len = 32
val_batches = 2
[batch]
global_tokens = 128
micro_batch = 4
[length]
steps = 6
[schedule]
warmup_steps = 2
[logging]
every = 2
val_every = 3
progress = true
[checkpoint]
every = 3
[precision]
mode = "fp32"
""")
    return str(path)


@pytest.mark.slow
def test_train_command_writes_metrics_events_plot_and_model(tmp_path, prepared, capsys):
    config = _write_config(tmp_path, prepared)
    assert train_cmd.main([config, "--optimizer.lr", "2e-3"]) == 0
    out, err = capsys.readouterr()
    assert "trained 6 steps, 768 tokens" in out and "validation loss" in out and "bits/byte" in out
    assert "MFU" in out and "loss.png" in out
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all({"loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= r.keys() for r in train_records)
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "final" / "model.safetensors").is_file() and (run / "final" / "config.json").is_file()
    assert json.loads((run / "config.json").read_text())["optimizer"]["lr"] == 2e-3
    assert "6/6" in err  # the progress bar ran to the end

    # A fresh start in the same folder replaces the old run instead of mixing with it.
    assert train_cmd.main([config, "--length.steps", "2", "--checkpoint.every", "0"]) == 0
    assert "removing the previous run's metrics.jsonl, tensorboard, checkpoints" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]


def test_train_command_config_error_names_the_key(tmp_path, prepared, capsys):
    config = _write_config(tmp_path, prepared)
    assert train_cmd.main([config, "--optimizer.learning_rate", "1e-3"]) == 2
    assert "optimizer.learning_rate: unknown key" in capsys.readouterr().err
    assert train_cmd.main([config, "--batch.micro_batch", "four"]) == 2
    assert "batch.micro_batch: expected an integer, got 'four'" in capsys.readouterr().err


@pytest.mark.slow
def test_time_bounded_run_stops_on_time(tmp_path, prepared, capsys):
    config = _write_config(tmp_path, prepared)
    assert train_cmd.main([config, "--length.steps", "0", "--length.max_minutes", "0.03", "--logging.every", "1000",
                           "--logging.progress", "false"]) == 0
    assert "time budget of 0.03 min reached at step" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert len(train_records) == 1 and train_records[0]["step"] >= 1  # the last step is logged
    assert train_records[0]["train_seconds"] >= 0.03 * 60 * 0.9


@pytest.mark.slow
def test_steady_throughput_leaves_out_the_first_step(make_config, monkeypatch):
    """The first step (where compiling happens) counts in the average but not in the steady throughput."""
    real, calls = trainer.cross_entropy_loss, []

    def loss_slow_at_first(logits, targets):  # stands in for a compile inside the first forward
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return real(logits, targets)

    monkeypatch.setattr(trainer, "cross_entropy_loss", loss_slow_at_first)
    result = trainer.train(make_config("--length.steps", "4", "--checkpoint.every", "0"))
    assert result.train_seconds > 1.5
    assert result.steady_tokens_per_s > 2 * result.tokens_per_s
    assert result.steady_mfu / result.mfu == pytest.approx(result.steady_tokens_per_s / result.tokens_per_s)
    assert f"after the first step (compile, warm-up): {result.steady_tokens_per_s:,.0f} tokens/s" in \
        "\n".join(train_cmd.summary_lines(result))

    single = trainer.train(make_config("--length.steps", "1", out="single"))
    assert single.steady_tokens_per_s is None
    assert "after the first step" not in "\n".join(train_cmd.summary_lines(single))
