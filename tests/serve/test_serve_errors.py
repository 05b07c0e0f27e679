"""User mistakes get OpenAI-style error JSON with the right status (400 validation and context, 401 API key, 404
model/route, 429 overload), never a 500, and the server keeps serving; /metrics, /health and vLLM's tokenizer
endpoints."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import API_KEY, meta_llama2_chat, sse_json  # noqa: E402

PROMPT = "Once upon a time"
USER = [{"role": "user", "content": "Hi"}]


def assert_error(body, status: int, param=None, code=None, kind="invalid_request_error"):
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == kind and err["param"] == param and err["code"] == code, (status, err)


def still_serving(server, ref):
    """A normal request right after: it succeeds with llamalab generate's greedy text."""
    status, body, _ = server.post("/v1/completions", {"model": server.model, "prompt": PROMPT, "max_tokens": 3,
                                                      "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == ref.text(PROMPT, 3)


BAD = [  # (path, body, param)
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70, "temperature": 1}, "seed"),  # was a 500 killing the batch
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, None),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, None),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt.str"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": USER + USER}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{json.dumps(b)[:48]}" for p, b, _ in BAD])
def test_bad_request_is_400(server, ref, path, body, param):
    status, answer, _ = server.post(path, {"model": server.model, **body})
    assert status == 400
    assert_error(answer, 400, param=param)
    still_serving(server, ref)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null"])
def test_body_that_is_not_a_json_object_is_400(server, ref, raw):
    status, answer, _ = server.post("/v1/completions", raw=raw)
    assert status == 400
    assert_error(answer, 400)
    still_serving(server, ref)


def test_null_means_the_default(server, ref):
    """OpenAI's API and vLLM take ``null`` for a parameter left unset (some clients send every field)."""
    unset = {"n": None, "stream": None, "echo": None, "logprobs": None, "stop": None, "top_p": None, "user": None,
             "presence_penalty": None, "stream_options": None}
    status, body, _ = server.post("/v1/completions", {"model": server.model, "prompt": PROMPT, "max_tokens": None,
                                                      "temperature": 0, "seed": None, **unset})
    assert status == 200, body
    assert body["choices"][0]["text"] == ref.text(PROMPT, 16)  # OpenAI's default max_tokens for completions
    status, body, _ = server.post("/v1/chat/completions", {"model": server.model, "messages": USER, "max_tokens": 5,
                                                           "temperature": None, "seed": 3, **unset})
    assert status == 200, body  # temperature null: the default 1.0
    prompt = meta_llama2_chat(ref.tokenizer, USER)
    assert body["choices"][0]["message"]["content"] == ref.text(prompt, 5, temperature=1.0, seed=3)


def test_context_overflow_is_400_context_length_exceeded(server, client, ref):
    context = client.models.retrieve(server.model).model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=context)
    assert info.value.status_code == 400
    assert_error(info.value.response.json(), 400, param="max_tokens", code="context_length_exceeded")
    n = len(ref.encode(PROMPT))
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=context - n, temperature=0,
                              stop=".")  # exactly the context: fine
    long = [{"role": "user", "content": "the end " * context}]
    for extra in ({"max_tokens": 4}, {}):  # without max_tokens too: a context error, not "max_tokens >= 0"
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=server.model, messages=long, **extra)
        assert_error(info.value.response.json(), 400, param="max_tokens", code="context_length_exceeded")
    still_serving(server, ref)


def test_unknown_model_is_404(server, client, ref):
    for call in (lambda: client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2),
                 lambda: client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=2),
                 lambda: client.models.retrieve("gpt-4")):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.status_code == 404
        assert_error(info.value.response.json(), 404, param="model", code="model_not_found")
    status, body, _ = server.request("GET", "/v1/nothing-here")
    assert status == 404
    assert_error(body, 404, kind="not_found_error")
    still_serving(server, ref)


def test_api_key(server, ref):
    wrong = server.client(api_key="not-the-key")
    for call in (lambda: wrong.completions.create(model=server.model, prompt=PROMPT, max_tokens=2),
                 lambda: wrong.chat.completions.create(model=server.model, messages=USER, max_tokens=2),
                 lambda: wrong.models.list()):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401
        assert_error(info.value.response.json(), 401, code="invalid_api_key")
    for path, body in [("/v1/completions", {"model": server.model, "prompt": PROMPT}), ("/tokenize", {"prompt": "x"}),
                       ("/detokenize", {"tokens": [1]})]:
        for key in (None, "", "test-key2"):
            status, answer, _ = server.post(path, body, key=key)
            assert status == 401, (path, key)
            assert_error(answer, 401, code="invalid_api_key")
    status, answer, _ = server.post("/v1/completions", {"model": server.model, "prompt": PROMPT}, key=None,
                                    headers={"Authorization": API_KEY})  # without "Bearer "
    assert status == 401
    for open_path in ("/health", "/metrics", "/tokenizer_info"):  # no key needed
        assert server.request("GET", open_path, key=None)[0] == 200
    still_serving(server, ref)


def open_stream(server, body: dict):
    conn = server.connection()
    conn.request("POST", "/v1/completions", body=json.dumps({"model": server.model, **body}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    return conn, conn.getresponse()


def test_overload_is_429_and_the_server_recovers(idle_server, client, ref):
    """All 4 slots busy and the 40 places of the queue taken: 429 with Retry-After, not a hang or a 500."""
    server = idle_server
    before = server.metrics()
    rejected = before["llamalab_requests_rejected_total"]
    streams = []
    try:
        for _ in range(2):  # 32 long requests: 4 decoding, 28 waiting
            conn, resp = open_stream(server, {"prompt": PROMPT, "max_tokens": 400, "n": 16, "temperature": 0,
                                              "stream": True})
            assert resp.status == 200
            streams.append(conn)
        m = server.metrics()
        assert m["llamalab_slots_busy"] == 4 and m["llamalab_queue_depth"] >= 20
        with pytest.raises(openai.RateLimitError) as info:  # 16 more do not fit in the 12 places left
            client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, n=16)
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "1"
        assert_error(info.value.response.json(), 429, code="overloaded", kind="server_busy")
        assert server.metrics()["llamalab_requests_rejected_total"] == rejected + 1
        status, body, headers = server.post("/v1/chat/completions", {"model": server.model, "messages": USER,
                                                                     "max_tokens": 2, "n": 16, "stream": True})
        assert status == 429 and headers["retry-after"] == "1"  # a stream is refused before it starts
        assert_error(body, 429, code="overloaded", kind="server_busy")
    finally:
        for conn in streams:
            conn.close()
    after = server.idle(timeout=20)  # the hung-up streams' requests, decoding and waiting, are all dropped
    # every accepted engine request (16 + 16, and the 12 of the refused one before the queue filled) has ended,
    # and /metrics counts each end once: those dropped while still waiting too
    accepted = after["llamalab_requests_total"] - before["llamalab_requests_total"]
    assert accepted == 16 + 16 + 12  # the refused chat stream found the queue full: none of its 16 went in
    assert finished(after) - finished(before) == accepted
    still_serving(server, ref)


def finished(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("llamalab_requests_finished_total{"))


def test_bad_request_does_not_disturb_one_in_flight(idle_server, ref):
    """A request in flight finishes normally while bad ones (including a seed torch cannot take) come and go."""
    server = idle_server
    ids = ref.encode(PROMPT)
    conn, resp = open_stream(server, {"prompt": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True})
    try:
        assert resp.status == 200
        for body in ({"prompt": "x", "seed": 2**64, "temperature": 1.0},
                     {"prompt": "x", "seed": -(2**63) - 1, "temperature": 1.0, "stream": True},
                     {"prompt": [10**6]}, {"prompt": "x", "max_tokens": 10**6}):
            status, answer, _ = server.post("/v1/completions", {"model": server.model, **body})
            assert status == 400, answer
        chunks = sse_json(resp.read())
    finally:
        conn.close()
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.continuation(ids, ref.tokens(ids, 60))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the extreme seeds that are allowed work
    for seed in (2**63 - 1, -(2**63)):
        status, body, _ = server.post("/v1/completions", {"model": server.model, "prompt": PROMPT, "max_tokens": 4,
                                                          "temperature": 1.0, "seed": seed, "n": 2})
        assert status == 200, body


def test_metrics_counters_move(idle_server, client, ref):
    server = idle_server
    before = server.metrics()
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, n=2, temperature=0)
    after = server.metrics()
    ids = ref.encode(PROMPT)
    assert after["llamalab_requests_total"] - before["llamalab_requests_total"] == 2
    assert after["llamalab_prompt_tokens_total"] - before["llamalab_prompt_tokens_total"] == 2 * len(ids)
    assert after["llamalab_generation_tokens_total"] - before["llamalab_generation_tokens_total"] == \
        r.usage.completion_tokens == 10
    length = 'llamalab_requests_finished_total{reason="length"}'
    assert after[length] - before.get(length, 0) == 2
    assert after["llamalab_decode_steps_total"] > before["llamalab_decode_steps_total"]
    ok = 'llamalab_http_responses_total{status="200"}'
    assert after[ok] - before[ok] >= 2  # the completion and the /metrics before it
    assert after["llamalab_slots"] == 4 and after["llamalab_slots_busy"] == 0 and after["llamalab_queue_depth"] == 0
    status, text, headers = server.request("GET", "/metrics", key=None)
    assert headers["content-type"].startswith("text/plain")
    assert "# TYPE llamalab_requests_total counter" in text and "# TYPE llamalab_slots_busy gauge" in text


def test_tokenizer_endpoints(server, ref):
    text = "Once upon a time, Lily saw a cat."
    for special, expected in ((True, ref.encode(text)), (False, ref.encode(text, bos=False))):
        status, body, _ = server.post("/tokenize", {"model": server.model, "prompt": text,
                                                    "add_special_tokens": special})
        assert status == 200 and body["tokens"] == expected and body["count"] == len(expected)
        assert body["max_model_len"] == ref.pretrained.args.max_seq_len
    # special tokens' strings are their ids, as vLLM's Hugging Face tokenizer reads them (lm-eval relies on it)
    tok = ref.tokenizer
    for prompt, expected in (("<s>", [tok.bos_id]), ("</s>", [tok.eos_id]),
                             ("The end.</s>", tok.encode("The end.", bos=False) + [tok.eos_id])):
        status, body, _ = server.post("/tokenize", {"prompt": prompt, "add_special_tokens": False})
        assert status == 200 and body["tokens"] == expected, prompt
    status, body, _ = server.post("/detokenize", {"model": server.model, "tokens": ref.encode(text)})
    assert status == 200 and body["prompt"] == ref.tokenizer.decode(ref.encode(text)) == text
    status, body, _ = server.post("/tokenize", {"messages": USER})
    assert status == 200 and body["tokens"] == meta_llama2_chat(ref.tokenizer, USER)
    status, info, _ = server.request("GET", "/tokenizer_info", key=None)
    assert status == 200 and info["bos_token"] == tok.id_to_piece(tok.bos_id) == "<s>"
    assert info["eos_token"] == tok.id_to_piece(tok.eos_id) == "</s>" and info["pad_token"] is None
    assert info["model_max_length"] == ref.pretrained.args.max_seq_len and info["chat_template"] is None
    status, body, _ = server.post("/tokenize", {"prompt": "x", "messages": USER})
    assert status == 400
    assert_error(body, 400)


def test_no_server_errors(server):
    """None of the requests above (nor the other files' so far) got a 5xx."""
    m = server.metrics()
    assert not {k: v for k, v in m.items() if k.startswith('llamalab_http_responses_total{status="5') and v}
    assert m.get('llamalab_requests_finished_total{reason="error"}', 0) == 0
    assert server.process.poll() is None
