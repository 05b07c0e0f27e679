"""32 simultaneous streaming requests of mixed settings over 4 slots: every one completes, and each equals its
solo output computed in this process with ``llamalab.generate`` (greedy and seeded sampling alike)."""

from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import meta_llama2_chat  # noqa: E402

CONCURRENT = 32
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird",
           "Sam was sad because", "The sun was hot and", "Mom said", "A cat"]
SETTINGS = [{"temperature": 0.0}, {"temperature": 0.9, "seed": 1}, {"temperature": 1.0, "top_k": 5, "seed": 2},
            {"temperature": 0.7, "top_p": 0.8, "seed": 3}, {"temperature": 1.2, "top_k": 30, "top_p": 0.9, "seed": 4}]


def plan():
    """(kind, prompt, max_tokens, settings, stop) per request: chat and completions, 3..24 tokens, some stops."""
    out = []
    for i in range(CONCURRENT):
        kind = "chat" if i % 3 == 2 else "completion"
        settings = dict(SETTINGS[i % len(SETTINGS)])
        if "seed" in settings:
            settings["seed"] += 100 * i
        stop = ["."] if i % 4 == 1 else None
        out.append((kind, PROMPTS[i % len(PROMPTS)], 3 + (7 * i) % 22, settings, stop))
    return out


async def one(client, model: str, kind: str, prompt: str, max_tokens: int, settings: dict, stop):
    kw = {k: v for k, v in settings.items() if k != "top_k"}
    if "top_k" in settings:
        kw["extra_body"] = {"top_k": settings["top_k"]}
    pieces, finish = [], []
    if kind == "chat":
        stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=max_tokens, stop=stop, stream=True, **kw)
        async for chunk in stream:
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish += [c.finish_reason] if c.finish_reason else []
    else:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stop=stop,
                                                 stream=True, **kw)
        async for chunk in stream:
            for c in chunk.choices:
                pieces.append(c.text)
                finish += [c.finish_reason] if c.finish_reason else []
    assert len(finish) == 1, finish
    return "".join(pieces), finish[0]


def test_32_simultaneous_streams_equal_their_solo_outputs(idle_server, ref):
    server = idle_server
    requests = plan()
    before = server.metrics()

    async def run_all():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, server.model, *r) for r in requests))

    results = asyncio.run(run_all())
    after = server.idle()
    assert after["llamalab_requests_total"] - before["llamalab_requests_total"] == CONCURRENT
    assert after["llamalab_requests_rejected_total"] == before["llamalab_requests_rejected_total"]
    # the requests overlapped: fewer decode steps than running them one after another would take
    steps = after["llamalab_decode_steps_total"] - before["llamalab_decode_steps_total"]
    generated = after["llamalab_generation_tokens_total"] - before["llamalab_generation_tokens_total"]
    assert steps < generated / 2

    for (kind, prompt, max_tokens, settings, stop), (text, finish) in zip(requests, results):
        ids = (meta_llama2_chat(ref.tokenizer, [{"role": "user", "content": prompt}]) if kind == "chat"
               else ref.encode(prompt))
        solo = ref.text(ids, max_tokens, stop=stop, **settings)  # llamalab generate, alone
        assert text == solo, (kind, prompt, max_tokens, settings, stop)
        tokens = ref.tokens(ids, max_tokens, **settings)
        cut = stop is not None and stop[0] in ref.continuation(ids, tokens)
        assert finish == ("stop" if cut or len(tokens) < max_tokens else "length")
