"""An imported Hugging Face checkpoint keeps its chat template: HF -> native (chat_template.jinja) -> HF."""

from __future__ import annotations

import json

import pytest

import llamalab
from llamalab.cli import main
from llamalab.convert.hf import export_hf, import_hf
from llamalab.errors import UserError

transformers = pytest.importorskip("transformers")

# zephyr-style: newlines that trim_blocks removes, special tokens, and non-ASCII text
TEMPLATE = ("{% for message in messages %}\n<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
            "{% endfor %}\n{% if add_generation_prompt %}<|assistant|> — «ok»\n{% endif %}")
OTHER = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a story"}]


def hf_folder(tmp_path, native_dir, *, config_value=None, jinja_file=None):
    """Our HF export of ``native_dir`` with ``chat_template`` set in tokenizer_config.json and/or the file."""
    hf = export_hf(native_dir, tmp_path / "hf")
    if config_value is not None:
        cfg_path = hf / "tokenizer_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": config_value}))
    if jinja_file is not None:
        (hf / "chat_template.jinja").write_bytes(jinja_file.encode("utf-8"))
    return hf


@pytest.mark.parametrize("form", ["string", "list", "jinja_file"])
def test_import_keeps_chat_template(tmp_path, native_dir, form):
    kwargs = {"string": {"config_value": TEMPLATE},
              "list": {"config_value": [{"name": "tool_use", "template": OTHER},
                                        {"name": "default", "template": TEMPLATE}]},
              "jinja_file": {"jinja_file": TEMPLATE, "config_value": OTHER}}[form]  # the file wins
    out = import_hf(hf_folder(tmp_path, native_dir, **kwargs), tmp_path / "out")
    assert (out / "chat_template.jinja").read_bytes() == TEMPLATE.encode("utf-8")
    assert llamalab.load(out).chat_template == TEMPLATE


def test_round_trip_renders_in_transformers(tmp_path, native_dir):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    out = import_hf(hf_folder(tmp_path, native_dir, config_value=TEMPLATE), tmp_path / "out")
    # native -> native (the CLI's copy) keeps it beside the tokenizer
    assert main(["convert", str(out), str(tmp_path / "copy"), "--to", "native", "--dtype", "bf16"]) == 0
    assert llamalab.load(tmp_path / "copy").chat_template == TEMPLATE
    export = export_hf(tmp_path / "copy", tmp_path / "hf2")
    assert json.loads((export / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok.chat_template == TEMPLATE
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True,
                                                bos_token="<s>", eos_token="</s>")
    assert text == expected
    assert text.startswith("<|system|>\nBe brief.</s>\n") and text.endswith("<|assistant|> — «ok»\n")
    assert (import_hf(export, tmp_path / "back") / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE


def test_without_chat_template(tmp_path, native_dir, capsys):
    out = import_hf(hf_folder(tmp_path, native_dir), tmp_path / "out")
    assert not (out / "chat_template.jinja").exists() and llamalab.load(out).chat_template is None
    export = export_hf(out, tmp_path / "hf2")
    assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())
    assert not (export / "chat_template.jinja").exists()
    # a list with no "default" template: a note, and no template
    hf = hf_folder(tmp_path, native_dir, config_value=[{"name": "tool_use", "template": OTHER}])
    out = import_hf(hf, tmp_path / "out")  # replaces the folder (it holds only native files)
    assert "no template named 'default'" in capsys.readouterr().out
    assert llamalab.load(out).chat_template is None


def test_replacing_a_folder_with_a_template(tmp_path, native_dir):
    """chat_template.jinja is a native file: a folder holding one is replaced whole, without --force."""
    out = import_hf(hf_folder(tmp_path, native_dir, jinja_file=TEMPLATE), tmp_path / "out")
    (tmp_path / "hf" / "chat_template.jinja").unlink()
    import_hf(tmp_path / "hf", out)
    assert not (out / "chat_template.jinja").exists()


@pytest.mark.parametrize("value, match", [
    (5, r'tokenizer_config.json: "chat_template" is a JSON number; expected a string or a list'),
    ({"default": TEMPLATE}, r'tokenizer_config.json: "chat_template" is a JSON object'),
    ([{"name": "default"}], r'tokenizer_config.json: "chat_template"\[0\] is \{"name": "default"\}; expected an '
                            r'object with string "name" and "template"'),
], ids=["number", "object", "list-item"])
def test_bad_chat_template_type(tmp_path, native_dir, value, match):
    hf = hf_folder(tmp_path, native_dir, config_value=value)
    with pytest.raises(UserError, match=match):
        import_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
