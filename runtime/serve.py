"""An OpenAI-compatible HTTP server over one ``Engine`` (stdlib only: ``http.server``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events, ``data: {...}`` chunks then ``data: [DONE]``), ``GET /v1/models``,
``GET /health``. Bad requests get a 400 with an OpenAI-style ``{"error": {...}}`` body.

Handler threads parse and validate; a single ``EngineWorker`` thread owns the engine and takes
``GenerationRequest``s from a queue, one sequence at a time (the engine has one KV slot today).
Each request carries its own event queue, so a batching worker that interleaves decode steps of
several requests can replace ``EngineWorker._serve_one`` without touching the HTTP side.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mla_compiler.errors import InputError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
REQUEST_TIMEOUT_S = 600.0
MAX_BODY_BYTES = 8 << 20


class RequestError(Exception):
    """A request the server refuses with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def body(self) -> dict:
        return {
            "error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}
        }


# ---- chat templates ----------------------------------------------------------------------


# DeepSeek-V2's template in plain Python: used when tokenizer_config.json has no chat_template
# or jinja2 is not installed.
def deepseek_chat_prompt(
    messages: Sequence[dict], *, bos: str = "", eos: str = "", add_generation_prompt: bool = True
) -> str:
    out = [bos]
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "user":
            out.append(f"User: {content}\n\n")
        elif role == "assistant":
            out.append(f"Assistant: {content}{eos}")
        elif role == "system":
            out.append(f"{content}\n\n")
        else:
            raise RequestError(
                f"unknown message role {role!r}: use system, user or assistant", param="messages"
            )
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value or ""


@functools.lru_cache(maxsize=8)
def _jinja_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _text_content(content: Any) -> str | None:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """``tokenizer_config.json``'s ``chat_template`` (jinja2, sandboxed as transformers does),
    else ``deepseek_chat_prompt``."""

    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate:
        file = Path(path) / "tokenizer_config.json"
        if not file.exists():
            return cls()
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{file} is not valid JSON ({e})") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        kw = dict(
            bos=self.bos_token, eos=self.eos_token, add_generation_prompt=add_generation_prompt
        )
        if self.template is None:
            return deepseek_chat_prompt(messages, **kw)
        try:
            from jinja2.exceptions import TemplateError
        except ImportError:
            return deepseek_chat_prompt(messages, **kw)
        try:
            return _jinja_template(self.template).render(
                messages=list(messages),
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:
            raise RequestError(f"chat template failed: {e}", param="messages") from None


# ---- the engine worker -------------------------------------------------------------------


@dataclasses.dataclass
class GenerationRequest:
    """One sequence to generate; the worker answers on ``events``:
    ("token", id), then ("done", "stop" | "length") or ("error", exception)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class EngineWorker(threading.Thread):
    """The one thread that touches the engine: requests are served in arrival order."""

    def __init__(self, engine):
        super().__init__(name="mla-engine", daemon=True)
        self.engine = engine
        self.requests: queue.Queue[GenerationRequest | None] = queue.Queue()

    def submit(self, req: GenerationRequest) -> GenerationRequest:
        self.requests.put(req)
        return req

    def stop(self) -> None:
        self.requests.put(None)

    def run(self) -> None:
        while (req := self.requests.get()) is not None:
            if req.cancelled.is_set():
                continue
            try:
                self._serve_one(req)
            except Exception as e:  # noqa: BLE001 — reported to the request, the worker lives on
                req.events.put(("error", e))

    def _serve_one(self, req: GenerationRequest) -> None:
        eos = self.engine.eos_token_id
        tok = None
        for tok in self.engine.stream(
            req.prompt_ids,
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop_ids=() if eos is None else (eos,),
        ):
            req.events.put(("token", tok))
            if req.cancelled.is_set():
                break
        req.events.put(("done", "stop" if tok is not None and tok == eos else "length"))


def _events(req: GenerationRequest) -> Iterator[tuple[str, Any]]:
    while True:
        try:
            kind, value = req.events.get(timeout=REQUEST_TIMEOUT_S)
        except queue.Empty:
            req.cancelled.set()
            raise RequestError("generation timed out", status=504, kind="server_error") from None
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


class TextStream:
    """Incremental detokenisation: the text each new token adds, holding back pieces that end
    in an incomplete UTF-8 sequence (decoded as U+FFFD) until the next token completes them."""

    def __init__(self, decode):
        self.decode, self.ids, self.sent = decode, [], 0

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent :], len(text)
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece, self.sent = text[self.sent :], len(text)
        return piece


# ---- request parsing ---------------------------------------------------------------------


def _number(body: dict, key: str, default, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        raise RequestError(
            f"{key} must be {'an integer' if kind is int else 'a number'}", param=key
        )
    return kind(value)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_context: int
    max_tokens: int
    vocab_size: int


class OpenAIServer:
    """The HTTP front: ``start()`` serves in a background thread; ``shutdown()`` stops it and
    the worker. Also a context manager."""

    def __init__(
        self,
        engine,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        model_name: str | None = None,
        max_tokens: int | None = None,
    ):
        self.engine = engine
        self.model_name = model_name or engine.meta["model"]["name"]
        self.limits = Limits(
            max_context=engine.max_context,
            max_tokens=min(max_tokens or engine.max_context, engine.max_context),
            vocab_size=engine.vocab_size,
        )
        self.chat = ChatTemplate.from_dir(engine.path)
        self.created = int(time.time())
        self.worker = EngineWorker(engine)
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> OpenAIServer:
        self.worker.start()
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="mla-http", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.worker.stop()
            self.httpd.server_close()

    def shutdown(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        if self.worker.is_alive():
            self.worker.stop()
            self.worker.join(timeout=30)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- request -> GenerationRequest ------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        if self.engine.tokenizer is None:
            raise RequestError(
                "this model has no tokenizer: send the prompt as a list of token ids",
                param="prompt",
            )
        return self.engine.encode(text)

    def prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise RequestError(
                "prompt must be a string or a list of token ids (one prompt)", param="prompt"
            )
        if not ids:
            raise RequestError("prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.limits.vocab_size - 1})",
                param="prompt",
            )
        return ids

    def chat_ids(self, messages: Any) -> list[int]:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and _text_content(m.get("content")) is not None
                for m in messages
            )
        ):
            raise RequestError(
                "messages must be a non-empty list of {role, content} objects with text content",
                param="messages",
            )
        messages = [{**m, "content": _text_content(m["content"])} for m in messages]
        roles = {m["role"] for m in messages} - {"system", "user", "assistant"}
        if roles:
            raise RequestError(
                f"unknown message role {roles.pop()!r}: use system, user or assistant",
                param="messages",
            )
        return self.prompt_ids(self._encode(self.chat.render(messages)))

    def build_request(
        self, body: dict, prompt_ids: list[int], *, chat: bool = False
    ) -> GenerationRequest:
        """Validate the sampling fields and limits. Semantics this server does not implement
        (stop strings, logprobs, echo, n > 1) are refused, never silently ignored."""
        lim = self.limits
        for key in ("stop", "logprobs", "top_logprobs", "echo", "suffix"):
            if body.get(key):
                raise RequestError(f"{key} is not supported yet", param=key)
        if len(prompt_ids) >= lim.max_context:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) fills the maximum context {lim.max_context}",
                param="messages" if chat else "prompt",
            )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        # chat defaults to the rest of the context (as OpenAI's), completions to 16
        rest = min(lim.max_tokens, lim.max_context - len(prompt_ids))
        default = rest if chat else DEFAULT_MAX_TOKENS
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default, int)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > lim.max_tokens:
            raise RequestError(
                f"max_tokens {max_tokens} exceeds this server's limit {lim.max_tokens}",
                param="max_tokens",
            )
        if len(prompt_ids) + max_tokens > lim.max_context:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"maximum context {lim.max_context}: shorten the prompt or ask for fewer tokens",
                param="max_tokens",
            )
        temperature = _number(body, "temperature", 1.0)
        if temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {temperature}", param="temperature")
        top_p = _number(body, "top_p", 1.0)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        top_k = _number(body, "top_k", 0, int)
        if top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {top_k}", param="top_k")
        if _number(body, "n", 1, int) != 1:
            raise RequestError("only n=1 is supported", param="n")
        seed = body.get("seed")
        if seed is not None:
            seed = _number(body, "seed", None, int)
        return GenerationRequest(prompt_ids, max_tokens, temperature, top_p, top_k, seed)


_ids = itertools.count()


def _usage(req: GenerationRequest, tokens: list[int]) -> dict:
    n, m = len(req.prompt_ids), len(tokens)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def _stream_chunk(head: dict, chat: bool, piece: str | None, toks: list[int], finish) -> dict:
    """One SSE chunk of a streamed answer: a chat delta or a completion's text piece."""
    if chat:
        delta = {} if piece is None else {"content": piece}
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": piece or "", "logprobs": None}
    choice.update(finish_reason=finish, token_ids=toks)
    return {**head, "choices": [choice]}


class _Handler(BaseHTTPRequestHandler):
    """The request handler; ``_make_handler`` binds it to one ``OpenAIServer`` as ``api``
    (``self.server`` is http.server's own: the ``ThreadingHTTPServer``)."""

    protocol_version = "HTTP/1.1"
    server_version = "mla-compiler"
    api: OpenAIServer

    def log_message(self, fmt, *args):  # quiet: one line per request would flood tests
        pass

    # ---- plumbing --------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

    def _start_sse(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    # ---- routes ----------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send_json(200, self._models())
        else:
            self._send_error(RequestError(f"no route GET {path}", status=404))

    def _models(self) -> dict:
        api = self.api
        return {
            "object": "list",
            "data": [
                {
                    "id": api.model_name,
                    "object": "model",
                    "created": api.created,
                    "owned_by": "mla-compiler",
                    "max_model_len": api.limits.max_context,
                }
            ],
        }

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if path not in routes:
            self._send_error(RequestError(f"no route POST {path}", status=404))
            return
        chat = routes[path]
        parsed = self._parse_request(chat)
        if parsed is None:
            return
        body, req = parsed
        self.api.worker.submit(req)
        self._answer(req, body, chat=chat)

    def _parse_request(self, chat: bool) -> tuple[dict, GenerationRequest] | None:
        """The body and its validated request; None once a refusal has been sent."""
        api = self.api
        try:
            body = self._body()
            ids = api.chat_ids(body.get("messages")) if chat else api.prompt_ids(body.get("prompt"))
            return body, api.build_request(body, ids, chat=chat)
        except RequestError as e:
            self._send_error(e)
        except InputError as e:  # tokenizer or template trouble
            self._send_error(RequestError(str(e)))
        return None

    def _answer(self, req: GenerationRequest, body: dict, *, chat: bool) -> None:
        """Send the submitted request's answer (streamed or whole); a failure before the
        headers went out is an error reply, a dropped client cancels the generation."""
        try:
            if body.get("stream"):
                options = body.get("stream_options") or {}
                usage = isinstance(options, dict) and bool(options.get("include_usage"))
                self._stream(req, chat=chat, usage=usage)
            else:
                self._complete(req, chat=chat)
        except (BrokenPipeError, ConnectionResetError):
            req.cancelled.set()
        except RequestError as e:
            req.cancelled.set()
            self._send_error(e)
        except InputError as e:
            self._send_error(RequestError(str(e)))
        except Exception as e:  # noqa: BLE001
            req.cancelled.set()
            self._send_error(
                RequestError(f"generation failed: {e}", status=500, kind="server_error")
            )

    # ---- answers ---------------------------------------------------------------------------
    def _head(self, chat: bool, chunk: bool) -> dict:
        prefix = "chatcmpl" if chat else "cmpl"
        kind = "chat.completion" if chat else "text_completion"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}-{next(_ids)}",
            "object": kind + ".chunk" if chat and chunk else kind,
            "created": int(time.time()),
            "model": self.api.model_name,
        }

    def _complete(self, req: GenerationRequest, *, chat: bool) -> None:
        tokens, finish = [], "length"
        for kind, value in _events(req):
            if kind == "token":
                tokens.append(value)
            else:
                finish = value
        text = self.api.engine.decode_text(tokens)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": 0, "text": text, "logprobs": None}
        )
        choice.update(finish_reason=finish, token_ids=tokens)
        usage = _usage(req, tokens)
        self._send_json(200, {**self._head(chat, False), "choices": [choice], "usage": usage})

    def _stream(self, req: GenerationRequest, *, chat: bool, usage: bool) -> None:
        """SSE chunks, one per token; with ``stream_options.include_usage`` a last chunk
        with empty choices and the usage, as OpenAI sends it."""
        head = self._head(chat, True)
        text = TextStream(self.api.engine.decode_text)
        self._start_sse()
        if chat:
            role = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
            self._sse({**head, "choices": [role]})
        try:
            for kind, value in _events(req):
                if kind == "token":
                    self._sse(_stream_chunk(head, chat, text.push(value), [value], None))
                else:
                    self._sse(_stream_chunk(head, chat, text.flush() or None, [], value))
            if usage:
                self._sse({**head, "choices": [], "usage": _usage(req, text.ids)})
        except RequestError as e:
            self._sse(e.body())
        except Exception as e:  # noqa: BLE001 — headers are sent: report in-band
            self._sse(
                RequestError(f"generation failed: {e}", status=500, kind="server_error").body()
            )
        self._sse("[DONE]")


def _make_handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    """The handler class of ``server``'s ``ThreadingHTTPServer`` (one class per server)."""

    class Handler(_Handler):
        api = server

    return Handler


def serve(
    artifact: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    max_context: int | None = None,
    max_tokens: int | None = None,
    log=print,
) -> None:
    """Load ``artifact`` and serve it until interrupted (``mla-compiler serve``)."""
    from mla_compiler.runtime import loader

    loader.use_runtime_only()
    from mla_compiler.runtime.engine import Engine

    engine = Engine.load(artifact, device, max_context=max_context, log=log)
    try:
        server = OpenAIServer(engine, host=host, port=port, max_tokens=max_tokens)
    except OSError as e:  # port taken, address not local, ...
        raise InputError(f"cannot listen on {host}:{port} ({e}): pick another --port") from None
    log(f"serving {server.model_name} on {server.url}/v1 (max context {engine.max_context})")
    server.serve_forever()
