"""Streaming in OpenAI's format, read as raw server-sent-event bytes and through the ``openai`` client: ``data:``
events, the chat role first and finish_reason last for each choice, usage when asked, then ``data: [DONE]``;
and a client that goes away mid-stream frees its slot."""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import API_KEY, boundary_stop, meta_llama2_chat, sse_json  # noqa: E402

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story about a red ball."}]


def raw_stream(server, path: str, body: dict) -> tuple[int, dict, bytes]:
    conn = server.connection()
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_chat_stream_events(server, ref):
    prompt = meta_llama2_chat(ref.tokenizer, MESSAGES)
    status, headers, raw = raw_stream(server, "/v1/chat/completions", {
        "model": server.model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_json(raw)
    *chunks, usage = events
    n = len(ref.tokens(prompt, 12))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == server.model for e in events)
    deltas = [c["choices"][0] for c in chunks]
    assert all(len(c["choices"]) == 1 and d["index"] == 0 for c, d in zip(chunks, deltas))
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}  # the role first
    assert deltas[-1]["delta"] == {} and deltas[-1]["finish_reason"] == ("length" if n == 12 else "stop")  # last
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert all(set(d["delta"]) == {"content"} and d["delta"]["content"] for d in deltas[1:-1])
    text = "".join(d["delta"]["content"] for d in deltas[1:-1])
    assert text == ref.text(prompt, 12)


def test_completion_stream_events_with_n(server, ref):
    ids = ref.encode(PROMPT)
    status, _, raw = raw_stream(server, "/v1/completions", {
        "model": server.model, "prompt": PROMPT, "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 4,
        "stream": True})
    assert status == 200
    chunks = sse_json(raw)
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    for j in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == j]
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["text"] == ""
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert "".join(m["text"] for m in mine) == ref.continuation(ids, ref.tokens(ids, 10, temperature=1.0,
                                                                                   seed=4 + j))
    assert "usage" not in chunks[-1] or chunks[-1]["usage"] is None


@pytest.mark.parametrize("logprobs", [None, 1])
def test_completion_stream_echo_equals_whole(server, client, logprobs):
    """echo streams the prompt first (it was dropped without logprobs), then the same text as the whole answer."""
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=logprobs, n=2)
    whole = client.completions.create(**kw)
    texts, tokens = ["", ""], [[], []]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens if c.logprobs else []
    assert all(t.startswith(PROMPT) for t in texts)
    assert texts == [c.text for c in whole.choices]
    if logprobs is not None:
        assert tokens == [c.logprobs.tokens for c in whole.choices]


def test_stream_with_stop_never_sends_it(server, ref):
    prompt = meta_llama2_chat(ref.tokenizer, MESSAGES)
    tokens = ref.tokens(prompt, 40)
    stop, before, _ = boundary_stop(ref, prompt, tokens, start=6)
    _, _, raw = raw_stream(server, "/v1/chat/completions", {
        "model": server.model, "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "stream": True,
        "stop": [stop]})
    deltas = [c["choices"][0] for c in sse_json(raw)]
    pieces = [d["delta"].get("content", "") for d in deltas]
    assert "".join(pieces) == before and deltas[-1]["finish_reason"] == "stop"
    assert not any(stop in p for p in pieces)


def test_openai_client_stream_equals_whole(server, client, ref):
    kw = dict(model=server.model, messages=MESSAGES, max_tokens=16, temperature=0.7, seed=21, logprobs=True,
              top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    roles, pieces, logprobs, finish = [], [], [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            pieces.append(c.delta.content or "")
            logprobs += c.logprobs.content if c.logprobs and c.logprobs.content else []
            finish += [c.finish_reason] if c.finish_reason else []
    assert roles == ["assistant"] and finish == [whole.choices[0].finish_reason]
    assert "".join(pieces) == whole.choices[0].message.content
    assert [(e.token, e.logprob) for e in logprobs] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert [[t.token for t in e.top_logprobs] for e in logprobs] == [
        [t.token for t in e.top_logprobs] for e in whole.choices[0].logprobs.content]


def test_client_disconnect_frees_its_slot(idle_server, ref):
    server = idle_server
    before = server.metrics()
    cancelled = 'llamalab_requests_finished_total{reason="cancelled"}'
    conn = server.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": server.model, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 2:  # a couple of events, then hang up
        line = resp.fp.readline()
        assert line, "the stream ended early"
        seen += line.startswith(b"data: ")
    busy = server.metrics()["llamalab_slots_busy"]
    start = time.monotonic()
    resp.close()
    conn.close()
    after = server.wait_for(lambda m: m["llamalab_slots_busy"] == 0
                            and m.get(cancelled, 0) == before.get(cancelled, 0) + 1, timeout=10,
                            what="the disconnected stream's slot")
    assert busy == 1
    assert time.monotonic() - start < 5
    # it stopped early: far fewer than the 400 tokens it asked for were generated
    assert after["llamalab_generation_tokens_total"] - before["llamalab_generation_tokens_total"] < 400


def test_non_streaming_client_disconnect_frees_its_slots(idle_server):
    """A whole (non-streamed) request whose client hangs up is cancelled too: its decoding and waiting choices.
    (It was not: Starlette's BaseHTTPMiddleware hid the disconnect, and the poll ran only when no token came.)"""
    server = idle_server
    before = server.metrics()
    cancelled = 'llamalab_requests_finished_total{reason="cancelled"}'
    conn = server.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": server.model, "prompt": PROMPT, "max_tokens": 450, "n": 16, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    server.wait_for(lambda m: m["llamalab_slots_busy"] == 4, timeout=10, what="the request's choices decoding")
    conn.close()
    after = server.wait_for(lambda m: m["llamalab_slots_busy"] == 0 and m["llamalab_queue_depth"] == 0, timeout=10,
                            what="the hung-up request's slots")
    # the server polls for a disconnect once a second: the 4 decoding choices and the 12 waiting end then (on
    # this machine, before the first 4 finish; a much faster one may finish some, so allow that)
    assert after.get(cancelled, 0) - before.get(cancelled, 0) >= 12
    assert after["llamalab_generation_tokens_total"] - before["llamalab_generation_tokens_total"] < 16 * 450 / 2
