"""Completions and chat through the official ``openai`` client against the real server, checked against
``llamalab.generate`` and a plain forward pass of the same checkpoint in this process: greedy and seeded tokens,
``n`` (choice j seeded seed + j), stop strings across token boundaries, logprobs/top_logprobs, echo, usage."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import boundary_stop, meta_llama2_chat  # noqa: E402

PROMPT = "Once upon a time"
LP_TOL = 5e-5  # fp32 log-probabilities: the server's cached decode step against one full forward (~4e-6 seen)

SAMPLING = [
    pytest.param({"temperature": 0.9, "seed": 7}, id="temperature"),
    pytest.param({"temperature": 1.0, "top_k": 8, "seed": 3}, id="top_k"),
    pytest.param({"temperature": 0.8, "top_p": 0.9, "seed": 11}, id="top_p"),
    pytest.param({"temperature": 1.3, "top_k": 40, "top_p": 0.85, "seed": 123}, id="top_k+top_p"),
]


def server_kwargs(settings: dict) -> dict:
    """The openai client's arguments for ``settings`` (``top_k`` is an extension: sent in the body)."""
    kw = {k: v for k, v in settings.items() if k != "top_k"}
    if "top_k" in settings:
        kw["extra_body"] = {"top_k": settings["top_k"]}
    return kw


def test_models_lists_the_checkpoint(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model


def test_greedy_completion_equals_generate(server, client, ref):
    ids = ref.encode(PROMPT)
    expected = ref.tokens(ids, 24)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0)
    (choice,) = r.choices
    assert choice.text == ref.text(PROMPT, 24) == ref.continuation(ids, expected)
    assert choice.logprobs.tokens == [ref.piece_text(t) for t in expected]
    assert choice.finish_reason == ("length" if len(expected) == 24 else "stop")
    assert r.object == "text_completion" and r.model == server.model and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(expected), len(ids) + len(expected))


def test_token_id_prompts_are_taken_as_given(server, client, ref):
    """A prompt of token ids (no BOS added) and a batch of two prompts: one choice each, in order."""
    a, b = ref.encode(PROMPT, bos=False), ref.encode("The little dog")
    r = client.completions.create(model=server.model, prompt=[a, b], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [ref.continuation(a, ref.tokens(a, 8)), ref.continuation(b, ref.tokens(b, 8))]
    assert r.usage.prompt_tokens == len(a) + len(b)


def test_equals_the_llamalab_generate_command(server, client, checkpoint, capsys):
    """The ``llamalab generate`` command itself (seeded top-k sampling with a stop string) prints the prompt and
    the text the server answers."""
    from llamalab.cli import main

    assert main(["generate", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "20", "--temperature", "0.8",
                 "--top-k", "20", "--seed", "17", "--stop", "."]) == 0
    printed = capsys.readouterr().out
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=20, temperature=0.8, seed=17,
                                  stop=".", extra_body={"top_k": 20})
    assert printed == PROMPT + r.choices[0].text + "\n"


@pytest.mark.parametrize("settings", SAMPLING)
def test_seeded_sampling_equals_generate(server, client, ref, settings):
    ids = ref.encode(PROMPT)
    gen = {k: v for k, v in settings.items()}
    expected = ref.tokens(ids, 16, **gen)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, logprobs=0,
                                  **server_kwargs(settings))
    assert r.choices[0].logprobs.tokens == [ref.piece_text(t) for t in expected]
    assert r.choices[0].text == ref.text(PROMPT, 16, **gen)
    again = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, **server_kwargs(settings))
    assert again.choices[0].text == r.choices[0].text


def test_n_choices_are_seeded_seed_plus_j(server, client, ref):
    ids = ref.encode(PROMPT)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, n=3, temperature=1.0, seed=42)
    expected = [ref.tokens(ids, 12, temperature=1.0, seed=42 + j) for j in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [ref.continuation(ids, e) for e in expected]
    assert len({c.text for c in r.choices}) > 1  # the seeds differ, so do the samples
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == sum(map(len, expected))

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    prompt = meta_llama2_chat(ref.tokenizer, messages)
    chat = client.chat.completions.create(model=server.model, messages=messages, max_tokens=10, n=3,
                                          temperature=0.9, top_p=0.95, seed=5)
    assert [c.message.content for c in chat.choices] == [
        ref.continuation(prompt, ref.tokens(prompt, 10, temperature=0.9, top_p=0.95, seed=5 + j)) for j in range(3)]
    assert [c.message.role for c in chat.choices] == ["assistant"] * 3


def test_stop_string_across_tokens_is_trimmed(server, client, ref):
    ids = ref.encode(PROMPT)
    tokens = ref.tokens(ids, 32)
    stop, before, needed = boundary_stop(ref, ids, tokens)
    assert ref.text(PROMPT, 32, stop=stop) == before  # llamalab generate cuts it the same way
    for stops in (stop, ["zzzq", stop]):
        r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0, stop=stops)
        assert r.choices[0].text == before
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == needed  # decoding ended at the token that completed the stop string

    pieces, finish = [], None
    for chunk in client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0,
                                           stop=stop, stream=True):
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == before and finish == "stop"
    assert not any(stop in p for p in pieces)


def test_chat_uses_llama2_format_and_equals_generate(server, client, ref):
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "A story about a dog, please."},
                {"role": "assistant", "content": "Once there was a dog."},
                {"role": "user", "content": "Another one!"}]
    prompt = meta_llama2_chat(ref.tokenizer, messages, space_before_eos=False)
    status, body, _ = server.post("/tokenize", {"model": server.model, "messages": messages})
    assert status == 200 and body["tokens"] == prompt and body["count"] == len(prompt)
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text(prompt, 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref.tokens(prompt, 12))
    # "developer" is OpenAI's new name for the system role; content may be a list of text parts
    dev = [{"role": "developer", "content": "You tell short stories."},
           {"role": "user", "content": [{"type": "text", "text": "A story about a dog, "},
                                        {"type": "text", "text": "please."}]}]
    r2 = client.chat.completions.create(model=server.model, messages=dev, max_tokens=6, temperature=0)
    prompt2 = meta_llama2_chat(ref.tokenizer, [{"role": "system", "content": "You tell short stories."},
                                               {"role": "user", "content": "A story about a dog, please."}])
    assert r2.usage.prompt_tokens == len(prompt2) and r2.choices[0].message.content == ref.text(prompt2, 6)
    r3 = client.chat.completions.create(model=server.model, messages=dev, max_completion_tokens=4, temperature=0)
    assert r3.usage.completion_tokens == 4 and r3.choices[0].message.content == ref.text(prompt2, 4)


def test_chat_without_max_tokens_runs_to_the_context(server, client, ref):
    """No max_tokens: the answer may use the whole context (here it stops at EOS or fills it)."""
    messages = [{"role": "user", "content": "Hi"}]
    prompt = meta_llama2_chat(ref.tokenizer, messages)
    context = client.models.retrieve(server.model).model_extra["max_model_len"]
    r = client.chat.completions.create(model=server.model, messages=messages, temperature=0, stop=["\n", "."])
    assert r.choices[0].message.content == ref.text(prompt, context - len(prompt), stop=["\n", "."])


def test_chat_logprobs_equal_log_softmax(server, client, ref):
    messages = [{"role": "user", "content": "Tell me about the park."}]
    prompt = meta_llama2_chat(ref.tokenizer, messages)
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 9}):
        r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, logprobs=True,
                                           top_logprobs=5, **settings)
        expected = ref.tokens(prompt, 8, **settings)
        content = r.choices[0].logprobs.content
        assert [e.token for e in content] == [ref.piece_text(t) for t in expected]
        lp = ref.logprobs(prompt + expected)
        for i, (entry, token) in enumerate(zip(content, expected)):
            row = lp[len(prompt) - 1 + i]
            assert entry.logprob == pytest.approx(float(row[token]), abs=LP_TOL)
            raw = ([int(entry.token[len("bytes:\\x"):], 16)] if entry.token.startswith("bytes:\\x")  # a lone byte
                   else list(entry.token.encode("utf-8")))
            assert entry.bytes == raw
            values = [t.logprob for t in entry.top_logprobs]
            assert len(values) == 5 and values == sorted(values, reverse=True)
            best = row.topk(5)
            assert values == pytest.approx(best.values.tolist(), abs=LP_TOL)
            assert [t.token for t in entry.top_logprobs] == [ref.piece_text(t) for t in best.indices.tolist()]
            if settings["temperature"] == 0:
                assert entry.top_logprobs[0].token == entry.token and values[0] == entry.logprob
    # logprobs without top_logprobs: the chosen token only
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=3, logprobs=True,
                                       temperature=0)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


def test_completion_echo_logprobs_score_the_prompt(server, client, ref):
    text = "Once upon a time there was a big dog"
    ids = ref.encode(text)
    r = client.completions.create(model=server.model, prompt=text, max_tokens=1, temperature=0, echo=True,
                                  logprobs=3)
    (choice,) = r.choices
    gen = ref.tokens(ids, 1)
    lp = ref.logprobs(ids + gen)
    logprobs = choice.logprobs
    assert choice.text == ref.tokenizer.decode(ids) + ref.continuation(ids, gen)
    assert logprobs.tokens == [ref.piece_text(t) for t in ids + gen]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [float(lp[i - 1, t]) for i, t in enumerate(ids + gen) if i > 0]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=LP_TOL)
    for i in range(1, len(ids) + 1):
        top = logprobs.top_logprobs[i]
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(float(lp[i - 1].max()), abs=LP_TOL)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1

    # max_tokens 0 with echo: score the prompt only (what lm-eval's loglikelihood needs)
    r0 = client.completions.create(model=server.model, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[:len(ids) - 1], abs=LP_TOL)
    assert r0.usage.completion_tokens == 0 and r0.choices[0].finish_reason == "length"
