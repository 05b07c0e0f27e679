"""Instruction data: templates, the loss mask at token level, bad records with file:line, long examples and
the loader's resumable order."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.errors import UserError
from llamalab.finetune.data import (
    ALPACA_PROMPT_INPUT,
    InstructionLoader,
    collate,
    load_instructions,
)
from llamalab.parallel.runtime import IGNORE_INDEX
from llamalab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(base):
    return Tokenizer(base)


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def one_row(path, tok, seq_len=90, **kwargs):
    data = load_instructions(path, tok, seq_len=seq_len, **kwargs)
    inputs, targets = collate([data.train[:1]], seq_len, 0)
    return data.train[0], inputs[0], targets[0]


def test_alpaca_masks_the_prompt_and_trains_the_response_and_eos(tmp_path, tok):
    record = {"instruction": "Repeat the first word: red blue", "input": "blue comes second", "output": "red"}
    path = write_jsonl(tmp_path / "a.jsonl", [record])
    example, inputs, targets = one_row(path, tok, fmt="alpaca")
    prompt = tok.encode(ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"]))
    response = tok.encode("red", bos=False, eos=True)
    assert example.ids == prompt + response  # encoded apart: the boundary falls between two tokens
    n = len(example.ids) - 1
    assert torch.equal(inputs[:n], torch.tensor(example.ids[:-1]))
    # target j predicts token j + 1: ignored while that token is in the prompt, then the response and EOS
    assert (targets[:len(prompt) - 1] == IGNORE_INDEX).all()
    assert targets[len(prompt) - 1:n].tolist() == response
    assert (targets[n:] == IGNORE_INDEX).all()  # padding

    _, _, all_targets = one_row(path, tok, fmt="alpaca", train_on_prompt=True)
    assert all_targets[:n].tolist() == example.ids[1:]  # every token but BOS is a target


def test_chat_trains_each_assistant_turn_only(tmp_path, tok):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "first word: red blue"},
                           {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "first word: green stone"},
                           {"role": "assistant", "content": " green "}]}
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    example, _, targets = one_row(path, tok, fmt="chat")
    turn1 = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nfirst word: red blue [/INST]")
    answer1 = tok.encode("red", bos=False, eos=True)
    turn2 = tok.encode("[INST] first word: green stone [/INST]")
    answer2 = tok.encode("green", bos=False, eos=True)
    assert example.ids == turn1 + answer1 + turn2 + answer2
    trained = [t for t in targets.tolist() if t != IGNORE_INDEX]
    assert trained == answer1 + answer2
    start2 = len(turn1 + answer1)
    assert targets[len(turn1) - 1:start2 - 1].tolist() == answer1
    assert (targets[start2 - 1:start2 + len(turn2) - 1] == IGNORE_INDEX).all()  # the second user turn
    _, _, all_targets = one_row(path, tok, fmt="chat", train_on_prompt=True)
    assert all_targets[:len(example.ids) - 1].tolist() == example.ids[1:]


def test_bad_records_are_counted_with_file_and_line_or_stop_when_strict(tmp_path, tok):
    good = {"instruction": "Repeat the first word: red blue", "output": "red"}
    lines = [good, "{not json", {"instruction": "x"}, {"instruction": 3, "output": "y"}, "[1, 2]", good]
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, lines)
    with open(path, "ab") as fh:
        fh.write(b'{"instruction": "caf\xe9", "output": "y"}\n')  # Latin-1, not UTF-8
    data = load_instructions(path, tok, fmt="alpaca", seq_len=90)
    assert data.records == 7 and len(data.train) == 2
    assert [m.split(": ", 1)[0] for m in data.bad] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7)]
    assert "invalid JSON" in data.bad[0] and "missing field 'output'" in data.bad[1]
    assert "field 'instruction' is int, expected a string" in data.bad[2]
    assert "expected a JSON object" in data.bad[3] and "invalid UTF-8" in data.bad[4]
    with pytest.raises(UserError, match=f"^{path}:2: invalid JSON"):
        load_instructions(path, tok, fmt="alpaca", seq_len=90, strict=True)

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]},
                                                 {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"chat.jsonl:1: bad chat record: message 1 .* role 'assistant'"):
        load_instructions(chat, tok, fmt="chat", seq_len=90, strict=True)
    with pytest.raises(UserError, match="no usable training example"):
        load_instructions(chat, tok, fmt="chat", seq_len=90)


def test_a_json_array_file_names_each_records_line(tmp_path, tok):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "Repeat the first word: red blue", "output": "red"},\n'
                    '  {"output": "x"},\n  {"instruction": "Repeat", "output": "y"}\n]\n')
    data = load_instructions(path, tok, fmt="alpaca", seq_len=90)
    assert len(data.train) == 2 and data.bad == [f"{path}:3: bad alpaca record: missing field 'instruction'"]
    path.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c"}\n]\n')
    with pytest.raises(UserError, match=f"{path}:3: invalid JSON"):
        load_instructions(path, tok, fmt="alpaca", seq_len=90)


def test_long_examples_are_truncated_or_dropped(tmp_path, tok):
    long_prompt = {"instruction": "Repeat the first word: " + "red blue " * 40, "output": "red green"}
    long_answer = {"instruction": "Repeat the first word: red blue", "output": "red " * 30}
    fits = {"instruction": "Repeat the first word: red blue", "output": "red"}
    path = write_jsonl(tmp_path / "l.jsonl", [long_prompt, long_answer, fits])
    seq_len = len(tok.encode(long_answer["instruction"])) + 5  # a row holds seq_len + 1: 6 answer tokens
    truncated = load_instructions(path, tok, fmt="alpaca", template="plain", seq_len=seq_len)
    # the long answer is cut to the context; the long prompt leaves no answer token within it: dropped
    assert (truncated.truncated, truncated.dropped, len(truncated.train)) == (1, 1, 2)
    assert len(truncated.train[0].ids) == seq_len + 1 and sum(truncated.train[0].trained) == 6
    dropped = load_instructions(path, tok, fmt="alpaca", template="plain", seq_len=seq_len, overlong="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped.train)) == (0, 2, 1)
    with pytest.raises(UserError, match="template: 'llama2-chat' is for 'chat' records"):
        load_instructions(path, tok, fmt="alpaca", template="llama2-chat", seq_len=seq_len)


@pytest.mark.parametrize("packing", [False, True])
def test_the_loader_resumes_where_it_stopped_and_splits_global_batches(alpaca_file, tok, packing):
    data = load_instructions(alpaca_file, tok, fmt="alpaca", seq_len=90, validation_fraction=0.2)
    assert data.validation and len(data.train) + len(data.validation) == 48
    opts = {"batch_size": 4, "seq_len": 90, "pad_id": 0, "seed": 3, "packing": packing}
    one = InstructionLoader(data.train, **opts)
    batches = [next(one) for _ in range(12)]  # more than an epoch
    assert one.epochs() > 1
    again = InstructionLoader(data.train, **opts)
    for _ in range(5):
        next(again)
    resumed = InstructionLoader(data.train, **opts)
    resumed.load_state_dict(again.state_dict())
    for expected in batches[5:]:
        got = next(resumed)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    ranks = [InstructionLoader(data.train, **{**opts, "batch_size": 2}, rank=r, world_size=2) for r in range(2)]
    for expected in batches[:3]:
        halves = [next(r) for r in ranks]
        assert torch.equal(torch.cat([h[1] for h in halves]), expected[1])
    with pytest.raises(UserError, match="data or batch settings changed"):
        InstructionLoader(data.train[1:], **opts).load_state_dict(one.state_dict())


def test_packing_puts_whole_examples_back_to_back(alpaca_file, tok):
    data = load_instructions(alpaca_file, tok, fmt="alpaca", template="plain", seq_len=64)
    loader = InstructionLoader(data.train, batch_size=2, seq_len=64, pad_id=0, seed=0, packing=True)
    inputs, targets = next(loader)
    taken = [loader._example(k) for k in range(loader.consumed)]  # the two rows' examples, in order
    lengths = [len(e.ids) - 1 for e in taken]
    split = max(i for i in range(1, len(taken) + 1) if sum(lengths[:i]) <= 64)  # row 0: all that fit
    assert len(taken) > 2 and sum(lengths[split:]) <= 64
    for row, examples in enumerate((taken[:split], taken[split:])):
        expected_inputs, expected_targets = collate([examples], 64, 0)  # back to back, each with its own mask
        assert torch.equal(inputs[row], expected_inputs[0]) and torch.equal(targets[row], expected_targets[0])
