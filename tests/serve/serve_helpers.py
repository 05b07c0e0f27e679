"""Helpers of the serve tests that are not fixtures: SSE parsing, Meta's Llama 2 chat format, stop-string picking.

A plain module (not conftest.py), so test files can import it by name.
"""

from __future__ import annotations

import json

API_KEY = "test-key"  # the session server's
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_llama2_chat(tokenizer, dialog: list[dict], space_before_eos: bool = True) -> list[int]:
    """Meta's ``Llama.chat_completion`` prompt (llama/generation.py, Llama 2), transcribed: the system message
    folded into the first user turn, each (user, assistant) pair ``<s>[INST] {user} [/INST] {answer} </s>``,
    then ``<s>[INST] {last user} [/INST]``. ``space_before_eos=False`` drops the space Meta leaves before ``</s>``
    (which llamalab's llama2-chat format documents that it omits)."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"],
                   "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    assert all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])
    tail = " " if space_before_eos else ""
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()}{tail}",
                                bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of a server-sent-event body, checking its framing: every event is exactly one
    ``data: ...`` line followed by a blank line."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"not one 'data: ' line: {block!r}"
        events.append(block[len("data: "):])
    return events


def sse_json(raw: bytes) -> list[dict]:
    """The JSON events of a stream that ends with ``data: [DONE]`` (checked), in order."""
    events = sse_events(raw)
    assert events and events[-1] == "[DONE]", events[-3:]
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def boundary_stop(ref, prompt_ids: list[int], tokens: list[int], start: int = 3) -> tuple[str, str, int]:
    """A stop string that spans a token boundary of this greedy continuation and first occurs there:
    (stop, the text before it, how many tokens the server must have generated to see it whole)."""
    text = ref.continuation(prompt_ids, tokens)
    for k in range(start, len(tokens) - 2):
        head = ref.continuation(prompt_ids, tokens[:k])
        b = len(head)
        if b < 2 or not text.startswith(head):
            continue
        stop = text[b - 2:b + 2]
        if len(stop) != 4 or "\ufffd" in stop or stop.strip() != stop or text.find(stop) != b - 2:
            continue
        if head[-2:] == stop[:2] and len(ref.continuation(prompt_ids, tokens[:k + 1])) >= b + 2:
            needed = next(n for n in range(k, len(tokens) + 1) if stop in ref.continuation(prompt_ids, tokens[:n]))
            return stop, text[:b - 2], needed
    raise AssertionError(f"no stop string spanning a token boundary in {text!r}")
