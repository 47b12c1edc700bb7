"""The OpenAI-compatible server over real HTTP on 127.0.0.1 (ephemeral port): answers equal the
engine's own greedy tokens (streamed and not, 8 concurrent clients), bad requests get 400s."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from test_tokenizer import MESSAGES, text_artifact

from mla_compiler.runtime.serve import ChatTemplate, OpenAIServer

MAX_CONTEXT, MAX_TOKENS = 128, 32
CLIENTS, PER_CLIENT = 8, 3


@pytest.fixture(scope="module")
def engine(hf_checkpoint, tmp_path_factory):
    from mla_compiler.runtime.engine import Engine

    return Engine.load(text_artifact(hf_checkpoint, tmp_path_factory), max_context=MAX_CONTEXT)


def _prompts(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(11)
    return [[1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def expected(engine):
    """(prompt ids, max_tokens, greedy tokens) from Engine.generate, before the server owns it."""
    cases = []
    for i, p in enumerate(_prompts(CLIENTS * PER_CLIENT, engine.vocab_size)):
        n = 4 + i % 7
        toks = engine.generate(p, max_new_tokens=n, stop_ids=(engine.eos_token_id,))
        cases.append((p, n, toks))
    chat_ids = engine.encode(ChatTemplate.from_dir(engine.path).render(MESSAGES))
    chat = engine.generate(chat_ids, max_new_tokens=10, stop_ids=(engine.eos_token_id,))
    rest = min(MAX_TOKENS, MAX_CONTEXT - len(chat_ids))  # chat's default max_tokens
    chat_default = engine.generate(chat_ids, max_new_tokens=rest, stop_ids=(engine.eos_token_id,))
    return {"cases": cases, "chat": (chat_ids, chat), "chat_default": chat_default}


@pytest.fixture(scope="module")
def server(engine, expected):
    srv = OpenAIServer(engine, host="127.0.0.1", port=0, max_tokens=MAX_TOKENS).start()
    yield srv
    srv.shutdown()
    with pytest.raises(OSError):  # really closed
        socket.create_connection(srv.address, timeout=2).close()


def _request(srv, method: str, path: str, body=None, *, raw: bytes | None = None):
    conn = http.client.HTTPConnection(*srv.address, timeout=120)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, resp.getheader("Content-Type"), payload
    finally:
        conn.close()


def _post(srv, path: str, body) -> tuple[int, dict]:
    status, _, payload = _request(srv, "POST", path, body)
    return status, json.loads(payload)


def _stream(srv, path: str, body) -> list:
    """The parsed SSE events of a streamed request; the last one must be [DONE]."""
    status, ctype, payload = _request(srv, "POST", path, {**body, "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [e for e in payload.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def _completion(srv, prompt, max_tokens: int, *, stream: bool) -> tuple[list[int], str, str]:
    body = {"model": "x", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        status, out = _post(srv, "/v1/completions", body)
        assert status == 200, out
        assert out["object"] == "text_completion"
        choice = out["choices"][0]
        assert out["usage"]["completion_tokens"] == len(choice["token_ids"])
        return choice["token_ids"], choice["text"], choice["finish_reason"]
    chunks = _stream(srv, "/v1/completions", body)
    toks = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    return toks, text, chunks[-1]["choices"][0]["finish_reason"]


def test_health_and_models(server, engine):
    status, ctype, payload = _request(server, "GET", "/health")
    assert status == 200 and json.loads(payload) == {"status": "ok"}
    status, _, payload = _request(server, "GET", "/v1/models")
    models = json.loads(payload)
    assert status == 200 and models["object"] == "list"
    assert models["data"][0]["id"] == engine.meta["model"]["name"]
    status, _, payload = _request(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(payload)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completion_matches_engine(server, engine, expected, stream):
    for prompt, n, want in expected["cases"][:4]:
        toks, text, finish = _completion(server, prompt, n, stream=stream)
        assert toks == want
        assert text == engine.decode_text(want)
        assert finish == ("stop" if want[-1] == engine.eos_token_id else "length")


def test_text_prompt(server, engine):
    prompt = "hello world, the latent cache"
    ids = engine.encode(prompt)
    status, out = _post(
        server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200 and out["usage"]["prompt_tokens"] == len(ids)
    toks, _, _ = _completion(server, ids, 6, stream=False)
    assert out["choices"][0]["token_ids"] == toks


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_chat_completion(server, engine, expected, stream):
    ids, want = expected["chat"]
    body = {"model": "x", "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    if not stream:
        status, out = _post(server, "/v1/chat/completions", body)
        assert status == 200 and out["object"] == "chat.completion"
        msg = out["choices"][0]["message"]
        assert msg["role"] == "assistant" and msg["content"] == engine.decode_text(want)
        assert out["choices"][0]["token_ids"] == want
        assert out["usage"]["prompt_tokens"] == len(ids)
        return
    chunks = _stream(server, "/v1/chat/completions", body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == engine.decode_text(want)
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == want


def test_chat_default_max_tokens_and_content_parts(server, expected):
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    status, out = _post(server, "/v1/chat/completions", {"messages": parts, "temperature": 0})
    assert status == 200 and out["choices"][0]["token_ids"] == expected["chat_default"]


def test_stream_include_usage(server, expected):
    prompt, n, want = expected["cases"][5]
    body = {
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    chunks = _stream(server, "/v1/completions", body)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(want),
        "total_tokens": len(prompt) + len(want),
    }
    assert [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]] == want


BAD = {
    "max-tokens-over-limit": ({"prompt": [1, 5, 6], "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    "over-context": ({"prompt": [1] + [5] * (MAX_CONTEXT - 10), "max_tokens": 11}, "max_tokens"),
    "zero-max-tokens": ({"prompt": [1, 5], "max_tokens": 0}, "max_tokens"),
    "negative-temperature": ({"prompt": [1, 5], "temperature": -0.5}, "temperature"),
    "top-p-zero": ({"prompt": [1, 5], "top_p": 0}, "top_p"),
    "top-p-over-one": ({"prompt": [1, 5], "top_p": 1.5}, "top_p"),
    "temperature-string": ({"prompt": [1, 5], "temperature": "hot"}, "temperature"),
    "token-out-of-range": ({"prompt": [1, 5, 256]}, "prompt"),
    "negative-token": ({"prompt": [1, -3]}, "prompt"),
    "empty-prompt": ({"prompt": []}, "prompt"),
    "no-prompt": ({"max_tokens": 3}, "prompt"),
    "n-two": ({"prompt": [1, 5], "n": 2}, "n"),
    "stop-strings": ({"prompt": [1, 5], "stop": ["\n"]}, "stop"),
    "logprobs": ({"prompt": [1, 5], "logprobs": 2}, "logprobs"),
    "prompt-fills-context": ({"prompt": [1] + [5] * (MAX_CONTEXT - 1)}, "prompt"),
}


@pytest.mark.parametrize("body,param", BAD.values(), ids=BAD.keys())
def test_bad_requests_get_400(server, body, param):
    status, out = _post(server, "/v1/completions", body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param
    assert out["error"]["message"]


RAW = {
    "syntax": b"{not json",
    "array": b"[1, 2]",
    "bytes": b"\xff\xfe",
    "nan-temperature": b'{"prompt": [1, 5], "temperature": NaN}',
}


@pytest.mark.parametrize("raw", RAW.values(), ids=RAW.keys())
def test_bad_json_gets_400(server, raw):
    status, _, payload = _request(server, "POST", "/v1/completions", raw=raw)
    assert status == 400 and json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_bad_chat_messages(server):
    for messages in (None, [], [{"role": "user"}], [{"role": "robot", "content": "hi"}]):
        status, out = _post(server, "/v1/chat/completions", {"messages": messages})
        assert status == 400 and out["error"]["param"] == "messages", messages


def test_concurrent_clients(server, engine, expected):
    """8 clients x 3 requests, alternating streamed and plain: every answer is the engine's
    greedy answer for that prompt, and the server is still healthy afterwards."""
    cases = expected["cases"]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for r in range(PER_CLIENT):
                i = c * PER_CLIENT + r
                prompt, n, _ = cases[i]
                results[i] = _completion(server, prompt, n, stream=(i % 2 == 1))
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    assert sorted(results) == list(range(CLIENTS * PER_CLIENT))
    for i, (_, _, want) in enumerate(cases):
        toks, text, _ = results[i]
        assert toks == want, f"request {i} (stream={i % 2 == 1})"
        assert text == engine.decode_text(want)
    assert _request(server, "GET", "/health")[0] == 200


def test_cli_serve(hf_checkpoint, tmp_path_factory):
    """`mla-compiler serve ART --port 0` answers /health and a completion, and exits on SIGINT."""
    art = text_artifact(hf_checkpoint, tmp_path_factory)
    # (faulthandler: SIGABRT dumps every thread's stack, for a server that does not exit)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mla_compiler.cli",
            "serve",
            str(art),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-context",
            "64",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # SIGINT as a terminal delivers it, whatever this process inherited: a test run started
        # in the background of a non-interactive shell (`cmd &`) ignores SIGINT, and so would
        # the server (Python keeps an inherited SIG_IGN)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "server exited before serving"
        port = int(re.search(r":(\d+)/v1", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({"prompt": [1, 5, 6, 7], "max_tokens": 3, "temperature": 0}),
        )
        out = json.loads(conn.getresponse().read())
        conn.close()
        assert len(out["choices"][0]["token_ids"]) <= 3 and out["usage"]["prompt_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        hung = ""
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                hung = proc.communicate(timeout=30)[1][-6000:]
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, f"no exit 30 s after SIGINT; its threads then:\n{hung}"
