"""Every user error is one line, ``llamalab <command>: error: ...``, naming the file or key; bugs keep a traceback.

Each row of ``CASES`` is a bad input run in process through ``llamalab.cli.main``. The fixtures are tiny and
built once: a tokenizer trained on a few sentences, a one-layer checkpoint, a truncated copy of it, task files
with a missing field and a bad JSON line.
"""

from __future__ import annotations

import json
import shutil

import pytest

import llamalab
from llamalab.cli import HAS_ACTIONS, main
from llamalab.errors import UserError

TEXT = ["Once upon a time there was a little girl who loved to play in the park with her red ball."] * 50


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """The files the cases name, as strings for ``str.format``: {ck}, {trunc}, {bare}, {data}, {tmp} ..."""
    from llamalab.checkpoint import WEIGHTS_NAME, save_pretrained
    from llamalab.model import ModelArgs, build_model
    from llamalab.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("cli_errors")
    tok = train_tokenizer(TEXT, 300, tmp / "tok")
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=300, multiple_of=16, max_seq_len=32)
    model = build_model(args, seed=0)
    ck = save_pretrained(tmp / "ck", model, tokenizer_path=tok)
    bare = save_pretrained(tmp / "bare", model)  # no tokenizer.model

    trunc = tmp / "trunc"
    shutil.copytree(ck, trunc)
    weights = (trunc / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])

    data = tmp / "data"
    records = {
        "boolq/validation": [{"passage": "p", "question": "q"}],
        "piqa/validation": [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, "{not json"],
        "winogrande/validation": [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "3"}],
        "arc_easy/test": [{"question": "q", "choices": {"label": ["A", "B"]}, "answerKey": "A"}],
        "arc_challenge/test": [{"question": "q", "choices": {"label": ["A"], "text": ["a"]}, "answerKey": "E"}],
    }
    for name, lines in records.items():
        (data / name).parent.mkdir(parents=True)
        (data / f"{name}.jsonl").write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))

    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (tmp / "junk.gguf").write_bytes(b"GGUF" + bytes(40))
    (tmp / "text.txt").write_text("Once upon a time. " * 10)
    (tmp / "not-a-tokenizer.model").write_text("hello")
    (tmp / "badprep").mkdir()
    (tmp / "badprep" / "manifest.json").write_text("{\n")
    (tmp / "badprep" / "COMPLETE").write_text("")
    return {"ck": str(ck), "bare": str(bare), "trunc": str(trunc), "data": str(data), "tmp": str(tmp),
            "tok": str(tok)}


EVAL = ["eval", "{ck}", "--no-progress"]
GEN = ["generate", "{ck}", "--max-new-tokens", "4"]
PLAN = ["--gpus", "8", "--gpu-memory", "80"]

# (id, argv, a substring the one error line must contain); {name} is a path from the ``paths`` fixture
CASES = [
    ("eval-missing-task-file", [*EVAL, "--tasks", "hellaswag", "--data-dir", "{data}"],
     "expected {data}/hellaswag/validation.jsonl"),
    ("eval-task-missing-field", [*EVAL, "--tasks", "boolq", "--data-dir", "{data}"],
     "{data}/boolq/validation.jsonl:1: missing field 'label' (expected passage, question, label)"),
    ("eval-task-bad-json-line", [*EVAL, "--tasks", "piqa", "--data-dir", "{data}"],
     "{data}/piqa/validation.jsonl:2: invalid JSON ("),
    ("eval-task-missing-nested-field", [*EVAL, "--tasks", "arc_easy", "--data-dir", "{data}"],
     "{data}/arc_easy/test.jsonl:1: missing field 'choices.text' (expected question, choices.text"),
    ("eval-task-answer-not-a-choice", [*EVAL, "--tasks", "arc_challenge", "--data-dir", "{data}"],
     "{data}/arc_challenge/test.jsonl:1: bad arc_challenge record: answerKey 'E' is not one of choices.label"),
    ("eval-task-bad-answer", [*EVAL, "--tasks", "winogrande", "--data-dir", "{data}"],
     "{data}/winogrande/validation.jsonl:1: bad winogrande record: field 'answer' is '3', expected '1' or '2'"),
    ("eval-unknown-task", [*EVAL, "--tasks", "nope"], "unknown task 'nope'"),
    ("eval-bad-limit", [*EVAL, "--limit", "0"], "--limit must be a positive integer"),
    ("eval-missing-checkpoint", ["eval", "{tmp}/nope"], "{tmp}/nope: no such folder"),
    ("eval-checkpoint-is-a-file", ["eval", "{tmp}/text.txt"], "{tmp}/text.txt: a file, not a folder"),
    ("eval-truncated-safetensors", ["eval", "{trunc}"],
     "{trunc}/model.safetensors: truncated or corrupt safetensors file ("),
    ("eval-no-tokenizer", ["eval", "{bare}"], "{bare}: no tokenizer.model"),
    ("eval-missing-perplexity-file", [*EVAL, "--perplexity", "{tmp}/missing.txt"], "{tmp}/missing.txt"),
    ("eval-perplexity-context-too-long", [*EVAL, "--perplexity", "{tmp}/text.txt", "--context", "99"],
     "--context 99"),
    ("eval-output-folder-missing", [*EVAL, "--output", "{tmp}/nope/out.json"], "--output {tmp}/nope/out.json"),
    ("eval-bad-device", [*EVAL, "--device", "nodevice"], "device 'nodevice'"),
    ("generate-missing-checkpoint", ["generate", "{tmp}/nope", "--prompt", "x"], "{tmp}/nope: no such folder"),
    ("generate-truncated-safetensors", ["generate", "{trunc}", "--prompt", "x"],
     "{trunc}/model.safetensors: truncated or corrupt safetensors file ("),
    ("generate-prompt-longer-than-context", [*GEN, "--prompt", "play in the park " * 20], "max_seq_len=32"),
    ("generate-negative-temperature", [*GEN, "--prompt", "x", "--temperature", "-1"], "temperature"),
    ("generate-prompt-and-interactive", [*GEN, "--prompt", "x", "--interactive"], "--interactive"),
    ("generate-no-tokenizer", ["generate", "{bare}"], "{bare}: no tokenizer.model"),
    ("convert-missing-checkpoint", ["convert", "{tmp}/nope", "{tmp}/out", "--to", "hf"], "{tmp}/nope"),
    ("convert-truncated-safetensors", ["convert", "{trunc}", "{tmp}/out", "--to", "hf"],
     "{trunc}/model.safetensors: truncated or corrupt safetensors file ("),
    ("convert-unsupported-dtype", ["convert", "{ck}", "{tmp}/out", "--to", "native", "--dtype", "f8"],
     "unknown dtype 'f8'"),
    ("convert-unsupported-gguf-dtype", ["convert", "{ck}", "{tmp}/out.gguf", "--to", "gguf", "--dtype", "q4"],
     "GGUF dtype 'q4'"),
    ("convert-hf-config-missing-keys", ["convert", "{tmp}/hf", "{tmp}/out", "--to", "native"],
     "{tmp}/hf/config.json: missing key(s) intermediate_size"),
    ("convert-corrupt-gguf", ["convert", "{tmp}/junk.gguf", "{tmp}/out", "--to", "native"],
     "{tmp}/junk.gguf: truncated or corrupt GGUF file"),
    ("convert-folder-without-gguf", ["convert", "{ck}", "{tmp}/out", "--to", "native", "--from", "gguf"],
     "{ck}: no .gguf file"),
    ("tokenizer-encode-missing-model", ["tokenizer", "encode", "--model", "{tmp}/nope", "x"],
     "{tmp}/nope: no such file"),
    ("tokenizer-info-not-a-model", ["tokenizer", "info", "--model", "{tmp}/not-a-tokenizer.model"],
     "{tmp}/not-a-tokenizer.model: not a SentencePiece model"),
    ("tokenizer-decode-id-out-of-range", ["tokenizer", "decode", "--model", "{tok}", "5", "300"],
     "ids [300] are not in {tok}'s vocabulary"),
    ("data-info-not-prepared", ["data", "info", "{tmp}"], "{tmp}: not a complete prepared data folder"),
    ("data-info-bad-manifest", ["data", "info", "{tmp}/badprep"], "{tmp}/badprep/manifest.json: invalid JSON at line 2"),
    ("plan-unknown-preset", ["plan", "llama-99b", *PLAN], "unknown model preset 'llama-99b'"),
    ("plan-missing-config", ["plan", "{tmp}/run.toml", *PLAN], "{tmp}/run.toml"),
    ("plan-bad-layout", ["plan", "llama-7b", *PLAN, "--tp", "3"], "not divisible"),
    ("plan-unknown-pp-schedule", ["plan", "llama-7b", *PLAN, "--pp", "2", "--pp-schedule", "Zigzag"],
     "pp_schedule must be one of"),
]


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line(argv, needle, paths, capsys, monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG", raising=False)
    argv = [a.format(**paths) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    command = " ".join(argv[:2] if argv[0] in HAS_ACTIONS else argv[:1])
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"llamalab {command}: error: "), err
    assert needle.format(**paths) in lines[0]


def _cut_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


LOAD_CASES = [
    ("truncated-safetensors", _cut_weights, {}, "model.safetensors: truncated or corrupt safetensors file"),
    ("config-not-an-object", lambda f: (f / "config.json").write_text("[1, 2]"), {},
     "config.json: expected a JSON object, got a JSON list"),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes(b"\xff{}"), {}, "config.json: not UTF-8"),
    ("missing-weights", lambda f: (f / "model.safetensors").unlink(), {}, "model.safetensors: missing"),
    ("config-ill-typed-field", lambda f: _edit_config(f, dim="x"), {},
     "config.json: ModelArgs.dim must be a positive integer, got 'x'"),
    ("config-missing-field", lambda f: _edit_config(f, dim=None), {}, "config.json: missing model field(s) ['dim']"),
    ("bad-device", lambda f: None, {"device": "nodevice"}, "device 'nodevice' is not usable here"),
]


@pytest.mark.parametrize("spoil, kwargs, needle", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_load_raises_a_user_error_naming_the_file(spoil, kwargs, needle, paths, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(paths["ck"], folder)
    spoil(folder)
    with pytest.raises((UserError, ValueError, OSError)) as info:
        llamalab.load(folder, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import llamalab.commands.plan

    def broken(argv):
        raise RuntimeError("bug")

    monkeypatch.setattr(llamalab.commands.plan, "main", broken)
    with pytest.raises(RuntimeError, match="bug"):
        main(["plan", "llama-7b", *PLAN])


def test_debug_reraises_a_user_error(monkeypatch):
    monkeypatch.delenv("LLAMALAB_DEBUG", raising=False)
    with pytest.raises(UserError, match="unknown model preset"):
        main(["plan", "llama-99b", *PLAN, "--debug"])
