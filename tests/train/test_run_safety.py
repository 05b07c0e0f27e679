"""What ``llamalab train`` does with a bad resume, a foreign run folder, a torn metrics file and a full disk:
a one-line error that names the cause, and nothing of the user's or of the last checkpoint lost."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from train_helpers import tiny_overrides

from llamalab.cli import main as cli
from llamalab.train import checkpoint as ckpt
from llamalab.train.metrics import read_metrics
from llamalab.train.trainer import train


class Killed(Exception):
    pass


def _die_at(step_to_die: int):
    def on_step(step, record):
        if step == step_to_die:
            raise Killed
    return on_step


@pytest.fixture
def run_cli(prepared, tmp_path, capsys):
    """``run_cli(out_dir, *overrides)`` -> (exit status, stdout, stderr) of ``llamalab train``."""
    config = tmp_path / "empty.toml"
    config.write_text("")

    def run(out_dir, *overrides):
        capsys.readouterr()
        status = cli(["train", str(config), *tiny_overrides(prepared, out_dir), *overrides])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("llamalab train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _crashed_run(make_config, out="run", *extra):
    with pytest.raises(Killed):
        train(make_config(*extra, out=out), on_step=_die_at(6))  # checkpoint at step 4, dies at 6
    return Path(make_config(out=out).run.out_dir)


def test_resume_auto_with_only_unusable_checkpoints_is_an_error_naming_each(make_config, run_cli):
    run = _crashed_run(make_config, "run", "--checkpoint.every", "2")
    folders = [folder for _, folder in ckpt.list_checkpoints(run / "checkpoints")]
    assert len(folders) == 2
    for folder in folders:
        (folder / "dcp" / "__0_0.distcp").write_bytes(b"garbage")
    metrics_before = (run / "metrics.jsonl").read_bytes()
    status, _, err = run_cli(run, "--resume", "auto")
    line = _one_error_line(err)
    assert status == 2 and "none of the 2 checkpoints" in line
    assert all(folder.name in line for folder in folders) and "truncated or altered" in line
    assert [f for _, f in ckpt.list_checkpoints(run / "checkpoints")] == folders  # nothing overwritten
    assert (run / "metrics.jsonl").read_bytes() == metrics_before


def test_resume_auto_without_checkpoints_starts_fresh_and_says_so(run_cli, tmp_path):
    status, out, err = run_cli(tmp_path / "new", "--resume", "auto", "--length.steps", "2")
    assert status == 0 and "trained 2 steps" in out
    assert "no checkpoint under" in err and "starting fresh" in err


def test_resume_with_another_model_names_the_setting(make_config, run_cli):
    run = _crashed_run(make_config)
    status, _, err = run_cli(run, "--resume", "auto", "--model.n_layers", "3")
    line = _one_error_line(err)
    assert status == 2 and "n_layers=2 in the checkpoint, 3 now" in line
    status, _, err = run_cli(run, "--resume", str(run / "checkpoints" / "step-00000004"), "--model.dim", "128")
    assert status == 2 and "dim=64 in the checkpoint, 128 now" in _one_error_line(err)


@pytest.mark.parametrize("overrides, expected", [
    (["--resume", "/nonexistent/step-00000004"], "--resume /nonexistent/step-00000004: no such checkpoint"),
    (["--data.prepared", "/nonexistent/prepared"], "data.prepared: /nonexistent/prepared does not exist"),
    (["--data.recipe", "/nonexistent/recipe.toml"], "data.recipe: /nonexistent/recipe.toml: no such recipe"),
    (["--model.n_layers", "two"], "model.n_layers"),
], ids=["resume-missing", "prepared-missing", "recipe-missing", "ill-typed-key"])
def test_bad_paths_and_keys_are_one_line(run_cli, tmp_path, overrides, expected):
    status, _, err = run_cli(tmp_path / "run", *overrides)
    assert status == 2 and expected in _one_error_line(err)


def test_a_folder_that_is_not_a_run_is_never_written(run_cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "config.json").write_text('{"mine": true}')
    status, _, err = run_cli(mine)
    assert status == 2 and "not a llamalab run folder" in _one_error_line(err) and "thesis.tex" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "thesis.tex"]
    assert (mine / "config.json").read_text() == '{"mine": true}'


def test_a_torn_metrics_line_is_repaired_on_resume_without_duplicates(make_config, run_cli):
    run = _crashed_run(make_config, "run", "--logging.plot", "true")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 7, "lo')  # what a full disk leaves of the last line
    status, out, err = run_cli(run, "--resume", "auto", "--logging.plot", "true")
    assert status == 0, err
    assert "dropped 1 unreadable line" in err and "loss.png" in out
    records = read_metrics(run / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 9))  # steps 5-6 were re-run and recorded once
    assert [r["step"] for r in records if r["split"] == "val"] == [8]


def test_a_full_disk_is_one_message_and_the_last_checkpoint_survives(run_cli, tmpfs):
    small_disk = tmpfs("3m")  # room for one tiny-model checkpoint (1.6 MB) but not for a second beside it
    run = small_disk / "run"
    status, _, err = run_cli(run, "--checkpoint.every", "4", "--checkpoint.keep", "1")
    line = _one_error_line(err)
    assert status == 2 and "disk full" in line and str(run / "checkpoints") in line
    assert "needed" in line and "step-00000004 is intact" in line
    assert [f.name for _, f in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000004"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step-00000004")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    status, out, err = run_cli(run, "--checkpoint.every", "4", "--checkpoint.keep", "1", "--resume", "auto")
    assert status == 0 and "trained 8 steps" in out, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
