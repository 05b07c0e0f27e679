"""A tiny base checkpoint (GQA, its own tokenizer) and instruction data for the fine-tuning tests."""

from __future__ import annotations

import json

import pytest
from finetune_helpers import WORDS, alpaca_records

from llamalab.finetune.data import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A native folder: a 2-layer model (4 query heads, 2 key/value heads) with random weights and a 600-piece
    tokenizer trained on the words and templates the data uses."""
    from llamalab.checkpoint import save_pretrained
    from llamalab.model import ModelArgs, build_model
    from llamalab.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("base")
    text = [" ".join(WORDS[i:] + WORDS[:i]) + " Repeat the first word: comes second" for i in range(len(WORDS))] * 4
    text += [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, "[INST] <<SYS>> <</SYS>> [/INST]"] * 20
    tok = train_tokenizer(text, 600, tmp / "tok")
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=600, multiple_of=16, max_seq_len=96)
    return save_pretrained(tmp / "base", build_model(args, seed=0), tokenizer_path=tok)


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records()))
    return path
