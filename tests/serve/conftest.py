"""One real ``llamalab serve`` process for the whole session, and the in-process references it is checked against.

The checkpoint is the shared ``stories260K`` imported from llama2.c, or, where the shared data is absent, a random
tiny model with a SentencePiece tokenizer trained here. The server runs as a subprocess
(``python -m llamalab serve CKPT --port FREE --slots 4 --api-key test-key``) on 127.0.0.1 and is killed at the end
of the session, also when a test or the start-up fails. The references (``ref``) load the same folder in this
process and decode it with ``llamalab.generate`` -- code that shares nothing with the server's engine but the model.

Tests import fastapi/uvicorn/openai through ``pytest.importorskip`` (the ``serve`` fixture and each test module),
so the folder skips where the serve extra is not installed.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from serve_helpers import API_KEY

from shared_data import SHARED

SLOTS = 4
MAX_QUEUE = 40  # room for the 32 simultaneous requests of test_concurrency; the overload test fills it
START_TIMEOUT_S = 180  # imports alone take ~10 s on a loaded machine

TEXT = [
    "Once upon a time there was a little girl named Lily who loved to play in the park.",
    "She saw a big red ball and wanted to play with it, but it was too high.",
    "The cat sat on the mat. The dog ran after the ball. They were happy friends.",
    "Tom had a toy car. He liked to race it on the floor with his sister every day.",
] * 20


def _random_tiny(out: Path) -> Path:
    """A random 2-layer model and a 320-piece byte-fallback BPE tokenizer normalizing text as Llama's does (not at
    all), so it keeps newlines and spaces (no shared data needed)."""
    import sentencepiece as spm

    from llamalab.checkpoint import save_pretrained
    from llamalab.model import ModelArgs, build_model

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.99,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    tok_path = out.parent / "tokenizer.model"
    tok_path.write_bytes(buf.getvalue())
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32, norm_eps=1e-5,
                     max_seq_len=512)
    model = build_model(args, seed=0)
    with torch.no_grad():  # sharper distributions than the init's, so greedy text is not one token repeated
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    return save_pretrained(out, model, tok_path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """stories260K imported from the shared llama2.c files, or a random tiny model where they are absent."""
    folder = SHARED / "weights" / "stories260K"
    root = tmp_path_factory.mktemp("serve")
    if (folder / "stories260K.bin").is_file() and (folder / "tok512.bin").is_file():
        from llamalab.convert.llama2c import import_llama2c

        return import_llama2c(folder / "stories260K.bin", root / "stories260K", tokenizer=folder / "tok512.bin")
    return _random_tiny(root / "tiny-random")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``llamalab serve``: its address, the model name it serves, and small raw-HTTP helpers."""

    host: str
    port: int
    model: str
    checkpoint: Path
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, api_key: str = API_KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=120, **kwargs)

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, *, key: str | None = API_KEY, raw: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict | str, dict]:
        """(status, the body parsed as JSON (or text), headers) of one plain request."""
        conn = self.connection()
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            if key is not None:
                hdrs["Authorization"] = f"Bearer {key}"
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return resp.status, parsed, {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def post(self, path: str, body=None, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics' samples: {"llamalab_slots_busy": 0.0, 'llamalab_requests_finished_total{reason="stop"}': ...}."""
        status, text, _ = self.request("GET", "/metrics", key=None)
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "the server's metrics") -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics)`` holds; fail after ``timeout`` seconds with the last values."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if predicate(m):
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: condition not met within {timeout} s; last /metrics: {m}")
            time.sleep(0.05)

    def idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Wait until no slot is busy and nothing waits (the previous test's cancelled requests have left)."""
        return self.wait_for(lambda m: m["llamalab_slots_busy"] == 0 and m["llamalab_queue_depth"] == 0, timeout,
                             "idle")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_server(checkpoint: Path, log: Path, *extra: str) -> Server:
    """Start ``python -m llamalab serve`` on a free port and wait for /health; the caller stops it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LLAMALAB_API_KEY", None)
    cmd = [sys.executable, "-m", "llamalab", "serve", str(checkpoint), "--port", str(port), "--slots", str(SLOTS),
           "--max-queue", str(MAX_QUEUE), "--api-key", API_KEY, "--log-level", "warning", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server("127.0.0.1", port, checkpoint.name, checkpoint, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llamalab serve exited with {process.returncode}:\n{server.log_text()}")
            try:
                status, body, _ = server.request("GET", "/health", key=None)
                if status == 200 and body == {"status": "ok"}:
                    return server
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llamalab serve did not answer /health within {START_TIMEOUT_S} s:\n"
                                   f"{server.log_text()}")
            time.sleep(0.1)
    except BaseException:
        _stop(process)
        raise


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    """The session's one server (4 slots, API key ``test-key``), stopped when the session ends."""
    srv = start_server(checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log")
    try:
        yield srv
        # the whole session's requests, user mistakes included, got no 5xx and broke no decode step
        assert srv.process.poll() is None, f"the server died:\n{srv.log_text()}"
        m = srv.metrics()
        bad = {k: v for k, v in m.items() if v and (k.startswith('llamalab_http_responses_total{status="5')
                                                   or k == 'llamalab_requests_finished_total{reason="error"}')}
        assert not bad, f"{bad}\n{srv.log_text()[-4000:]}"
    finally:
        _stop(srv.process)


@pytest.fixture
def client(server):
    pytest.importorskip("openai")
    return server.client()


@pytest.fixture
def idle_server(server):
    """The server, once nothing is decoding or waiting; after the test, it is still alive."""
    server.idle()
    yield server
    assert server.process.poll() is None, f"the server died:\n{server.log_text()}"


class Reference:
    """The same checkpoint in this process, decoded by ``llamalab.generate`` (not the server's engine)."""

    def __init__(self, path: Path):
        import llamalab

        self.pretrained = llamalab.load(path)
        self.tokenizer = self.pretrained.tokenizer
        self.model = self.pretrained.model.eval()
        self.backend = self.pretrained.accelerate()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def tokens(self, prompt_ids: list[int], max_tokens: int, *, temperature: float = 0.0, top_k=None, top_p=None,
               seed=None) -> list[int]:
        """``generate_tokens``' tokens alone in a batch of one, without the final EOS (the server never sends it)."""
        from llamalab.generate import generate_tokens

        out = generate_tokens(self.backend, [prompt_ids], max_new_tokens=max_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, eos_id=self.tokenizer.eos_id)[0]
        return out[:-1] if out and out[-1] == self.tokenizer.eos_id else out

    def text(self, prompt, max_tokens: int, **kwargs) -> str:
        """``Pretrained.generate``: the text ``llamalab generate`` prints for these settings."""
        return self.pretrained.generate(prompt, max_new_tokens=max_tokens, **kwargs)

    def continuation(self, prompt_ids: list[int], tokens: list[int]) -> str:
        """The text of ``tokens`` after ``prompt_ids`` (decoded together, so a leading space survives)."""
        full, head = self.tokenizer.decode(prompt_ids + tokens), self.tokenizer.decode(prompt_ids)
        assert full.startswith(head)
        return full[len(head):]

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) log-softmax of one plain full-sequence forward: row i predicts token i + 1."""
        logits = self.model(torch.tensor([ids]))[0].float()
        return torch.log_softmax(logits, -1)

    def piece_text(self, token: int) -> str:
        """A token as OpenAI's logprobs show it: its SentencePiece piece with ``▁`` as a space."""
        piece = self.tokenizer.id_to_piece(token)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        if byte:
            value = int(byte.group(1), 16)
            return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
        return piece.replace("\u2581", " ")


@pytest.fixture(scope="session")
def ref(checkpoint) -> Reference:
    return Reference(checkpoint)

