"""The server's chat formats, in process (no server): the default against Meta's Llama 2 ``chat_completion``
transcribed here, and a checkpoint's Jinja template against transformers' own ``apply_chat_template`` of the same
template on a tokenizer from our Hugging Face export."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2")

from serve_helpers import meta_llama2_chat  # noqa: E402

from llamalab.serve.chat import ChatFormat, ChatTemplateError  # noqa: E402

DIALOGS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Tell me a story.  "}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "A story, please"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"},
     {"role": "assistant", "content": " Four. "}, {"role": "user", "content": "Five\nsix"}],
]

# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template, verbatim
HF_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# zephyr-style: block tags on their own lines (trim_blocks/lstrip_blocks matter), eos_token inside the text
ZEPHYR = ("{% for message in messages %}\n    {% if message['role'] == 'user' %}\n<|user|>\n{{ message['content'] }}"
          "{{ eos_token }}\n    {% elif message['role'] == 'system' %}\n<|system|>\n{{ message['content'] }}"
          "{{ eos_token }}\n    {% else %}\n<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n    {% endif %}\n"
          "{% endfor %}\n{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}")
# ChatML-style with a namespace, a loop filter and a BOS at the start
CHATML = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages if m['content'] %}"
          "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m['role'] }} #{{ ns.n }}\n{{ m['content'] | trim }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    import llamalab

    return llamalab.load(checkpoint).tokenizer


@pytest.mark.parametrize("dialog", DIALOGS, ids=lambda d: f"{len(d)}-messages")
def test_default_format_is_metas_llama2_chat(tokenizer, dialog):
    fmt = ChatFormat(tokenizer)
    assert fmt.name == "llama2-chat" and fmt.template_text is None
    ours = fmt.prompt_ids(dialog)
    assert ours == meta_llama2_chat(tokenizer, dialog, space_before_eos=False)
    meta = meta_llama2_chat(tokenizer, dialog)
    if not any(m["role"] == "assistant" for m in dialog):
        assert ours == meta  # nothing before an EOS: exactly Meta's
    elif ours != meta:  # the one documented difference: Meta's "{answer} </s>" keeps a space token before each EOS
        # (a tokenizer that normalizes away trailing whitespace, like the random fallback's, has none to keep)
        eos = [i for i, t in enumerate(meta) if t == tokenizer.eos_id]
        assert eos and all(tokenizer.id_to_piece(meta[i - 1]) == "\u2581" for i in eos)  # a lone "▁"
        assert ours == [t for i, t in enumerate(meta) if i + 1 not in eos]
    # the text: the pieces Meta's strings hold, one <s>[INST] ... [/INST] per user turn
    text = tokenizer.decode(ours)
    assert text.count("[INST]") == text.count("[/INST]") == len([m for m in dialog if m["role"] == "user"])
    assert ours.count(tokenizer.bos_id) == text.count("[INST]") and ours[-1] != tokenizer.eos_id


@pytest.mark.parametrize("dialog", [[{"role": "assistant", "content": "x"}],
                                    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                    [{"role": "system", "content": "s"}]])
def test_default_format_refuses_what_meta_refuses(tokenizer, dialog):
    with pytest.raises(ChatTemplateError):
        ChatFormat(tokenizer).prompt_ids(dialog)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from llamalab.convert.hf import export_hf

    return transformers.AutoTokenizer.from_pretrained(export_hf(checkpoint, tmp_path_factory.mktemp("hf") / "hf"))


def hf_ids(hf_tokenizer, template: str, dialog) -> list[int]:
    out = hf_tokenizer.apply_chat_template(dialog, chat_template=template, tokenize=True, add_generation_prompt=True)
    return list(out if isinstance(out, list) else out["input_ids"])


@pytest.mark.parametrize("template", [HF_LLAMA2, ZEPHYR, CHATML], ids=["llama2-hf", "zephyr", "chatml"])
@pytest.mark.parametrize("dialog", DIALOGS, ids=lambda d: f"{len(d)}-messages")
def test_jinja_template_renders_as_transformers(tokenizer, hf_tokenizer, template, dialog):
    ours = ChatFormat(tokenizer, template)
    assert ours.template_text == template
    text = hf_tokenizer.apply_chat_template(dialog, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    assert ours.prompt_ids(dialog) == hf_ids(hf_tokenizer, template, dialog), text
    assert tokenizer.decode(ours.prompt_ids(dialog)) == tokenizer.decode(hf_tokenizer(text, add_special_tokens=False)
                                                                           ["input_ids"])


def test_jinja_template_errors(tokenizer, hf_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        hf_ids(hf_tokenizer, HF_LLAMA2, bad)  # transformers refuses it ...
    with pytest.raises(ChatTemplateError, match="alternate"):
        ChatFormat(tokenizer, HF_LLAMA2).prompt_ids(bad)  # ... and so do we, as a user error (a 400)
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        ChatFormat(tokenizer, "{% for m in messages %}")
