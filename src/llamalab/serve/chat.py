"""Chat messages -> prompt token ids.

A checkpoint imported from Hugging Face keeps its chat template (``chat_template.jinja`` in the native folder);
it is rendered as transformers renders it: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, ``messages``, ``add_generation_prompt=True``, ``bos_token``/``eos_token`` and
``raise_exception``. The rendered text is tokenized without an added BOS, the BOS and EOS strings in it becoming
their ids, as a Hugging Face tokenizer treats special tokens.

Without one, the default is Meta's Llama 2 chat format, the one ``llamalab finetune`` trains chat data with
(``llama2-chat``): ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant}</s><s>[INST] ...``,
ending with the last user turn's ``[/INST]``.
"""

from __future__ import annotations

import re

from ..errors import UserError
from ..finetune.data import encode_segments, llama2_chat_segments

__all__ = ["ChatFormat", "ChatTemplateError"]

DEFAULT_NAME = "llama2-chat"


class ChatTemplateError(UserError, ValueError):
    """The messages do not fit the chat format (roles out of order, wrong types) or the template refused them."""


class ChatFormat:
    """Renders messages with ``template`` (Jinja text) when given, else Meta's Llama 2 chat format."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer, self.template_text = tokenizer, template
        self.name = "checkpoint's chat_template.jinja" if template else DEFAULT_NAME
        self._compiled = None
        if template:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._compiled = env.from_string(template)
            except TemplateError as exc:
                raise ChatTemplateError(f"chat_template.jinja: not a valid Jinja template ({exc})") from None
        special = {tokenizer.bos_id: "bos_token", tokenizer.eos_id: "eos_token"}
        self.special = {tokenizer.id_to_piece(i): i for i in special if i is not None and i >= 0}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self._compiled is None:
            try:
                segments = llama2_chat_segments({"messages": messages}, generation=True)
            except ValueError as exc:
                raise ChatTemplateError(f"messages: {exc}") from None
            return encode_segments(segments, self.tokenizer, train_on_prompt=True).ids
        from jinja2.exceptions import TemplateError

        tok = self.tokenizer
        try:
            text = self._compiled.render(messages=messages, add_generation_prompt=True,
                                         bos_token=tok.id_to_piece(tok.bos_id) if tok.bos_id >= 0 else "",
                                         eos_token=tok.id_to_piece(tok.eos_id) if tok.eos_id >= 0 else "")
        except TemplateError as exc:
            raise ChatTemplateError(f"messages: the chat template refused them: {exc}") from None
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        """``text`` as ids, the special tokens' strings in it as their ids (never split into pieces)."""
        if not self.special:
            return self.tokenizer.encode(text, bos=False)
        ids = []
        pattern = "(" + "|".join(re.escape(s) for s in self.special) + ")"
        for part in re.split(pattern, text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.tokenizer.encode(part, bos=False)
        return ids


def _raise(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)
