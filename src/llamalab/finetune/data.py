"""Instruction data for ``llamalab finetune``: records, prompt templates, loss masks and batches.

Two formats, in a JSON array file or in JSONL (one object per line):

- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``, Stanford Alpaca's records;
- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``, OpenAI's shape:
  an optional system message, then user and assistant turns in turn, ending with the assistant's.

A template turns a record into segments of text, each a prompt (no loss by default) or a response (trained).
Segments are encoded one by one and concatenated, so the boundary between prompt and response falls exactly
between two tokens (SentencePiece's dummy prefix starts each response with a word boundary, like the space
after ``### Response:``). The targets of prompt tokens are ``IGNORE_INDEX`` (-100, ``F.cross_entropy``'s
default) unless ``train_on_prompt``.

A bad record (invalid UTF-8 or JSON, not an object, a field missing or of the wrong type, roles out of turn)
is counted and skipped with its ``file:line``; ``strict`` stops at the first.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.loader import IGNORE_INDEX, held_out_share
from ..errors import UserError

# Stanford Alpaca's templates, verbatim (tatsu-lab/stanford_alpaca, train.py: PROMPT_DICT)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Meta's Llama 2 chat format (facebookresearch/llama, generation.py: chat_completion)
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SKIPPED_SHOWN = 5  # bad records named one by one in the log; the rest are counted


class BadRecord(UserError, ValueError):
    """A record that cannot be used; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool  # a response: its tokens are targets
    bos: bool = False  # begin with BOS (each prompt turn, as Meta's chat format encodes them)
    eos: bool = False  # end with EOS (each response)


def _text(record: dict, key: str, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is {type(value).__name__}, expected a string")
    return value


def alpaca_segments(record: dict) -> list[Segment]:
    """Alpaca's prompt (with or without the input), then the output."""
    instruction, extra = _text(record, "instruction"), _text(record, "input", optional=True)
    output = _text(record, "output")
    if extra:
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [Segment(prompt, False, bos=True), Segment(output, True, eos=True)]


def plain_segments(record: dict) -> list[Segment]:
    """No wrapper: the instruction (and the input on the next line), then the output as its continuation."""
    instruction, extra = _text(record, "instruction"), _text(record, "input", optional=True)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    return [Segment(prompt, False, bos=True), Segment(_text(record, "output"), True, eos=True)]


def llama2_chat_segments(record: dict, generation: bool = False) -> list[Segment]:
    """``<s>[INST] {user} [/INST] {assistant}</s>`` per turn, the system message folded into the first user
    turn, as Meta's ``chat_completion`` builds a dialog (without its space before ``</s>``). A training dialog
    ends with the assistant's turn; with ``generation`` it ends with the user's, the prompt for the next answer."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("missing field 'messages' (a non-empty list)" if "messages" not in record
                         else "field 'messages' is not a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is {type(message).__name__}, expected an object")
        role, content = _text(message, "role"), _text(message, "content")
        turns.append((role, content))
    if turns[0][0] == "system":
        if len(turns) < 2:
            raise ValueError("a system message with no user message after it")
        (_, system), (role, content) = turns[0], turns[1]
        turns = [(role, B_SYS + system + E_SYS + content)] + turns[2:]
    segments = []
    for i, (role, content) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i + 1} (after any system message) has role {role!r}, expected {expected!r}: "
                             "user and assistant take turns")
        if expected == "user":
            segments.append(Segment(f"{B_INST} {content.strip()} {E_INST}", False, bos=True))
        else:
            segments.append(Segment(content.strip(), True, eos=True))
    if generation and len(turns) % 2 == 0:
        raise ValueError("the last message is the assistant's; a chat request ends with the user's")
    if not generation and len(turns) % 2:
        raise ValueError("the last message is the user's; a training dialog ends with the assistant's")
    return segments


TEMPLATES: dict[str, tuple[str, Callable[[dict], list[Segment]]]] = {
    "alpaca": ("alpaca", alpaca_segments),
    "plain": ("alpaca", plain_segments),
    "llama2-chat": ("chat", llama2_chat_segments),
}
DEFAULT_TEMPLATE = {"alpaca": "alpaca", "chat": "llama2-chat"}


def template_for(fmt: str, name: str) -> Callable[[dict], list[Segment]]:
    """The segment builder of template ``name`` ("default": the format's own); it must suit ``fmt``."""
    name = DEFAULT_TEMPLATE[fmt] if name == "default" else name
    suits, build = TEMPLATES[name]
    if suits != fmt:
        raise UserError(f"finetune.template: {name!r} is for {suits!r} records, not {fmt!r}; use "
                        f"{DEFAULT_TEMPLATE[fmt]!r} or 'default'")
    return build


# ----------------------------------------------------------------------------------------------------------
# Reading records


def _line_of(data: bytes | str, offset: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, offset) + 1


def read_records(path: Path) -> Iterator[tuple[str, dict | BadRecord]]:
    """(``file:line``, record or the BadRecord saying why it is unusable) for each record of a JSONL file or of
    a JSON array file (one whose first non-blank character is ``[``)."""
    try:
        data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM may open the file
    except FileNotFoundError:
        raise FileNotFoundError(f"finetune.data: {path}: no such file") from None
    if data.lstrip()[:1] == b"[":
        yield from _array_records(path, data)
        return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield where, BadRecord(f"{where}: invalid UTF-8 (byte {exc.start} of the line)")
            continue
        except json.JSONDecodeError as exc:
            yield where, BadRecord(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        yield where, record if isinstance(record, dict) else BadRecord(
            f"{where}: expected a JSON object, got {type(record).__name__}")


def _array_records(path: Path, data: bytes) -> Iterator[tuple[str, dict | BadRecord]]:
    """The elements of a JSON array, each with the line it starts on. A syntax error ends the file: one line
    naming where (there is no next record to resume at)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"{path}:{_line_of(data, exc.start)}: invalid UTF-8 in a JSON array file") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        where = f"{path}:{_line_of(text, pos)}"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        yield where, record if isinstance(record, dict) else BadRecord(
            f"{where}: expected a JSON object, got {type(record).__name__}")
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif not (pos < len(text) and text[pos] == "]"):
            raise BadRecord(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or ']' after a record)")


# ----------------------------------------------------------------------------------------------------------
# Examples


@dataclass
class Example:
    ids: list[int]  # BOS ... EOS, at most seq_len + 1 tokens
    trained: list[bool]  # per token: whether it is a target

    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), ``len(ids) - 1`` each: targets are the next tokens, IGNORE_INDEX where untrained."""
        ids = np.asarray(self.ids, dtype=np.int64)
        return ids[:-1], np.where(self.trained[1:], ids[1:], IGNORE_INDEX)


@dataclass
class InstructionData:
    """Tokenized examples split into training and validation, with the counts the log reports."""

    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    records: int = 0
    bad: list[str] = field(default_factory=list)  # one message per skipped record
    truncated: int = 0
    dropped: int = 0  # overlong (``overlong = "drop"``) or with no response token left within seq_len

    def summary(self) -> str:
        n = len(self.train) + len(self.validation)
        tokens = sum(len(e.ids) for e in self.train + self.validation)
        return (f"{self.records:,} records: {n:,} examples ({len(self.train):,} train, {len(self.validation):,} "
                f"validation, {tokens / max(n, 1):.0f} tokens on average), {len(self.bad):,} bad records "
                f"skipped, {self.truncated:,} truncated and {self.dropped:,} dropped as longer than the context")


def encode_segments(segments: list[Segment], tokenizer, train_on_prompt: bool) -> Example:
    ids, trained = [], []
    for seg in segments:
        seg_ids = tokenizer.encode(seg.text, bos=seg.bos, eos=seg.eos)
        ids += seg_ids
        trained += [seg.trained or train_on_prompt] * len(seg_ids)
    return Example(ids, trained)


def held_out(record: dict, fraction: float) -> bool:
    """Whether ``record`` is in the validation split: a hash of its content, so the split does not depend on
    the order of the file, and duplicates fall on the same side."""
    key = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
    return zlib.crc32(key) / 2**32 < fraction


def load_instructions(path: str | Path, tokenizer, *, fmt: str, template: str = "default", seq_len: int,
                      train_on_prompt: bool = False, validation_fraction: float = 0.0,
                      overlong: str = "truncate", strict: bool = False) -> InstructionData:
    """Read, template, tokenize and split the records of ``path``; an example holds at most ``seq_len + 1``
    tokens (``seq_len`` inputs and targets)."""
    build = template_for(fmt, template)
    out = InstructionData()
    for where, record in read_records(Path(path)):
        out.records += 1
        if not isinstance(record, BadRecord):
            try:
                example = encode_segments(build(record), tokenizer, train_on_prompt)
            except ValueError as exc:
                record = BadRecord(f"{where}: bad {fmt} record: {exc}")
        if isinstance(record, BadRecord):
            if strict:
                raise record
            out.bad.append(str(record))
            continue
        overlong_now = len(example.ids) > seq_len + 1
        if overlong_now and overlong == "truncate":
            example = Example(example.ids[:seq_len + 1], example.trained[:seq_len + 1])
        if len(example.ids) > seq_len + 1 or not any(example.trained[1:]):  # nothing to learn within the context
            out.dropped += 1
            continue
        out.truncated += overlong_now
        (out.validation if held_out(record, validation_fraction) else out.train).append(example)
    if not out.train:
        raise UserError(f"finetune.data: {path}: no usable training example ({out.summary()})")
    return out


def collate(rows: list[list[Example]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), (len(rows), seq_len) each: every row's examples back to back, then padding (inputs
    ``pad_id``, targets IGNORE_INDEX)."""
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for r, examples in enumerate(rows):
        pairs = [e.pair() for e in examples]
        n = sum(len(i) for i, _ in pairs)
        inputs[r, :n] = np.concatenate([i for i, _ in pairs])
        targets[r, :n] = np.concatenate([t for _, t in pairs])
    return torch.from_numpy(inputs), torch.from_numpy(targets)


STATE_VERSION = 1


class InstructionLoader:
    """Infinite (inputs, targets) batches of training examples, padded to ``seq_len``; exact to resume.

    Every epoch visits the examples in a fresh permutation seeded by ``(seed, epoch)``. A row holds the next
    example of that order or, with ``packing``, as many whole next examples as fit in ``seq_len`` (each attends
    to the ones before it in its row, as packing without attention masks does). A global batch is
    ``batch_size * world_size`` consecutive rows and each data-parallel rank takes its own, so any layout sees
    what one process with the global batch sees (as ``MixtureLoader``).
    """

    def __init__(self, examples: list[Example], *, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, packing: bool = False):
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.rank, self.global_batch_size, self.packing = seed, rank, batch_size * world_size, packing
        self.fingerprint = zlib.crc32(json.dumps([e.ids for e in examples]).encode())
        self.step = 0
        self.consumed = 0  # examples handed out (every rank counts the whole global batch)
        self._perm: tuple[int, np.ndarray] | None = None

    def __iter__(self):
        return self

    def _example(self, k: int) -> Example:
        epoch, j = divmod(k, len(self.examples))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self.examples[int(self._perm[1][j])]

    def _row(self) -> list[Example]:
        row = [self._example(self.consumed)]
        used = len(row[0].ids) - 1
        while self.packing and used + len(self._example(self.consumed + 1).ids) - 1 <= self.seq_len:
            self.consumed += 1
            row.append(self._example(self.consumed))
            used += len(row[-1].ids) - 1
        self.consumed += 1
        return row

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row() for _ in range(self.global_batch_size)]
        self.step += 1
        return collate(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], self.seq_len, self.pad_id)

    def epochs(self) -> float:
        return self.consumed / len(self.examples)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "consumed": self.consumed, "seed": self.seed,
                "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "packing": self.packing,
                "examples": len(self.examples), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume where ``state`` left off: the same examples (by their tokens), seed and global batch."""
        mine = self.state_dict()
        changed = [f"{k}={state.get(k)!r} in the checkpoint, {mine[k]!r} now" for k in mine
                   if k not in ("step", "consumed") and state.get(k) != mine[k]]
        if changed:
            raise UserError(f"the fine-tuning data or batch settings changed since the checkpoint ({'; '.join(changed)}); "
                            "resume with the same data and settings, or train into a new run.out_dir")
        self.step, self.consumed = int(state["step"]), int(state["consumed"])


class InstructionValidation:
    """The held-out examples in fixed batches, the same examples whatever the layout (as ``ValidationSet``).

    The held-out set is the first ``max_batches * batch_rows`` examples in the file's order (all of them when
    there are fewer, or when ``max_batches`` is None), one example a row: ``batch_rows`` is the unit of
    ``max_batches``, in rows, and does not depend on the layout (the task passes the training global batch,
    ``batch.global_tokens / seq_len`` rows, so ``data.val_batches`` counts training global batches of examples;
    it defaults to ``batch_size``). So every layout -- ``world_size``, ``batch_size`` -- evaluates exactly the
    same examples.

    ``world_size`` data-parallel ranks split those examples into consecutive shares of ``ceil(n / world_size)``;
    each rank yields its share in ``(inputs, targets)`` batches of exactly ``batch_size`` rows (pipeline
    micro-batches split them), as many on every rank (``len``). The rows past the end of a share (the last batch,
    or a rank with nothing left) are padding: inputs ``pad_id``, targets ``IGNORE_INDEX``, so they take no loss,
    and the loss summed with the counts of targets not ignored over every rank is the token-weighted mean over
    exactly the held-out examples.
    """

    def __init__(self, examples: list[Example], *, batch_size: int, seq_len: int, pad_id: int,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1, batch_rows: int | None = None):
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.examples, self.rows, self.num_batches = held_out_share(  # this rank's rows may be short or empty
            examples, batch_size=batch_size, max_batches=max_batches, batch_rows=batch_rows, rank=rank,
            world_size=world_size)

    def __len__(self) -> int:
        return self.num_batches

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(self.num_batches):
            real = [[e] for e in self.rows[b * self.batch_size:(b + 1) * self.batch_size]]
            inputs = torch.full((self.batch_size, self.seq_len), self.pad_id, dtype=torch.int64)
            targets = torch.full((self.batch_size, self.seq_len), IGNORE_INDEX, dtype=torch.int64)
            if real:
                inputs[:len(real)], targets[:len(real)] = collate(real, self.seq_len, self.pad_id)
            yield inputs, targets
