"""``llamalab finetune`` end to end on a tiny base: LoRA and full runs, exact resume after a crash, the merge
command, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from finetune_helpers import finetune_overrides
from safetensors.torch import load_file

from llamalab.checkpoint import load_model
from llamalab.cli import main
from llamalab.config import load_config
from llamalab.convert.dcp import read_model_state
from llamalab.finetune.lora import apply_lora
from llamalab.finetune.task import FinetuneTask
from llamalab.parallel.safe_dcp import read_dcp_metadata
from llamalab.train.metrics import read_metrics
from llamalab.train.trainer import train


class Killed(Exception):
    pass


def kill_at(step_to_die: int):
    def on_step(step, record):
        if step == step_to_die:
            raise Killed(f"simulated crash after step {step}")
    return on_step


def records(out_dir, split: str) -> list[dict]:
    return [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if r["split"] == split]


@pytest.fixture(scope="module")
def lora_run(base, alpaca_file, tmp_path_factory):
    """A LoRA run through the CLI (a config file plus overrides), with one bad record in its data."""
    tmp = tmp_path_factory.mktemp("lora")
    data = tmp / "data.jsonl"
    data.write_text(alpaca_file.read_text() + '{"instruction": "no output"}\n')
    config = tmp / "lora.toml"
    config.write_text(f'[finetune]\nbase = "{base}"\ndata = "{data}"\nmethod = "lora"\n\n[lora]\nrank = 4\n'
                      'alpha = 8\ntarget_modules = ["wq", "wv", "w2", "output"]\n')
    assert main(["finetune", str(config), *finetune_overrides(base, data, tmp / "run")[6:]]) == 0
    return tmp / "run", data


def test_a_lora_run_writes_a_peft_adapter_and_the_merged_model(lora_run, base, tmp_path, capsys):
    run, data = lora_run
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["peft_type"]) == (4, 8.0, "LORA")
    assert adapter["target_modules"] == ["down_proj", "lm_head", "q_proj", "v_proj"]
    keys = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * (3 * 2 + 1)
    # the checkpoint's optimizer state holds the adapters only
    metadata = read_dcp_metadata(run / "checkpoints" / "step-00000008" / "dcp")
    state_keys = [k for k in metadata.state_dict_metadata if k.startswith("optimizer.state.")]
    assert state_keys and all(".lora_" in k for k in state_keys)
    val = records(run, "val")
    assert val and "bpb" not in val[-1] and val[-1]["loss"] > 0
    assert records(run, "train")[-1]["loss"] < records(run, "train")[0]["loss"]

    # `finetune merge` from the run folder writes what the run's final/ holds, which differs from the base
    main(["finetune", "merge", str(run), str(tmp_path / "merged")])
    assert "merged" in capsys.readouterr().out
    merged, final = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(
        str(run / "final" / "model.safetensors"))
    base_weights = load_file(str(base / "model.safetensors"))
    for name, tensor in final.items():
        assert torch.equal(merged[name], tensor), name
    changed = {n for n in final if not torch.equal(final[n], base_weights[n])}
    assert changed == {f"layers.{i}.{m}.weight" for i in range(2)
                       for m in ("attention.wq", "attention.wv", "feed_forward.w2")} | {"output.weight"}


def test_merged_final_model_gives_the_trained_adapter_models_logits(lora_run):
    """The LoRA model as trained (the last checkpoint's weights) and the merged final/ compute the same."""
    run, _ = lora_run
    model, _, _ = load_model(run / "final")
    adapted, _, _ = load_model(json.loads((run / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"])
    apply_lora(adapted, ["wq", "wv", "w2", "output"], 4, 8.0)
    adapted.load_state_dict(read_model_state(run / "checkpoints" / "step-00000008" / "dcp"))
    tokens = torch.tensor([[1, 30, 200, 7, 99, 5]])
    with torch.no_grad():
        assert (model(tokens) - adapted.eval()(tokens)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_a_crash_is_exact(base, alpaca_file, tmp_path, method):
    """8 steps straight == 6 steps, a crash (after the step-4 checkpoint), then --resume auto: every loss and
    the final weights bit for bit (LoRA with dropout: the random streams resume too)."""
    straight = load_config(None, finetune_overrides(base, alpaca_file, tmp_path / "straight", method))
    train(straight, task=FinetuneTask(straight))
    crashed = load_config(None, finetune_overrides(base, alpaca_file, tmp_path / "crashed", method))
    with pytest.raises(Killed):
        train(crashed, task=FinetuneTask(crashed), on_step=kill_at(6))
    resumed = load_config(None, finetune_overrides(base, alpaca_file, tmp_path / "crashed", method)
                          + ["--checkpoint.resume", "auto"])
    assert train(resumed, task=FinetuneTask(resumed)).steps == 8
    expected = {r["step"]: r["loss"] for r in records(tmp_path / "straight", "train")}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "crashed", "train")}
    assert sorted(got) == list(range(1, 9)) and got == expected
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "adapter").is_dir() == (method == "lora")


@pytest.mark.parametrize("extra, message", [
    (["--finetune.base", ""], "finetune.base: required"),
    (["--model.dim", "64"], "model: dim set, but a fine-tuned model has the shape of finetune.base"),
    (["--parallel.tp", "2"], "LoRA fine-tuning runs in one process or data-parallel"),
    (["--strict"], r"data.jsonl:49: bad alpaca record: missing field 'output'"),
    (["--finetune.format", "chat", "--strict"], r"data.jsonl:1: bad chat record: missing field 'messages'"),
    (["--finetune.template", "llama2-chat"], "template: 'llama2-chat' is for 'chat' records, not 'alpaca'"),
])
def test_errors_are_one_line(lora_run, base, tmp_path, capsys, extra, message):
    _, data = lora_run
    assert main(["finetune", "/dev/null", *finetune_overrides(base, data, tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamalab finetune: error: ") and "\n" not in err
    assert re.search(message, err), err
