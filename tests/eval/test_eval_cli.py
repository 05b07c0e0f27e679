"""``llamalab eval`` end to end on a tiny checkpoint: the table, the JSON report and the perplexity mode."""

from __future__ import annotations

import json

import pytest

from llamalab.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from llamalab.checkpoint import save_pretrained
    from llamalab.model import build_model, preset_args
    from shared_data import shared_path

    tok = shared_path("weights", "stories260K", "tok512.reconstructed.model")
    folder = tmp_path_factory.mktemp("ck") / "tiny"
    save_pretrained(folder, build_model(preset_args("tiny", max_seq_len=512), seed=0), tok)
    return folder


def test_eval_tasks_writes_table_and_json(checkpoint, shared, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(checkpoint), "--tasks", "boolq,winogrande,openbookqa", "--data-dir",
                 str(shared("eval")), "--limit", "3", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| task | n | acc | acc_norm | paper llama-7b (reference) |" in printed and "| openbookqa | 3 |" in printed
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"boolq", "winogrande", "openbookqa"}
    for task, examples in report["examples"].items():
        assert len(examples) == 3
        acc = sum(e["correct"]["acc"] for e in examples) / 3
        assert report["results"][task]["acc"] == pytest.approx(acc)
        for e in examples:
            assert e["pred"]["acc"] == max(range(len(e["loglikelihoods"])), key=lambda i: e["loglikelihoods"][i])
    assert report["examples"]["openbookqa"][0]["unconditional_loglikelihoods"] is not None
    assert report["examples"]["winogrande"][0]["unconditional_loglikelihoods"] is None

    assert main(["eval", str(checkpoint), "--tasks", "boolq", "--data-dir", str(shared("eval")), "--limit", "2",
                 "--scoring", "paper", "--dtype", "bf16", "--no-progress"]) == 0
    assert "(calibrated)" in capsys.readouterr().out


def test_eval_perplexity_and_errors(checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl. " * 20)
    out = tmp_path / "p.json"
    assert main(["eval", str(checkpoint), "--perplexity", str(text), "--context", "64", "--stride", "32",
                 "--output", str(out), "--no-progress"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["context"] == 64 and report["stride"] == 32 and report["bits_per_byte"] > 0
    assert main(["eval", str(checkpoint), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
