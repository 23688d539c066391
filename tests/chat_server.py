"""A local OpenAI-compatible chat-completions server for tests (spec/evaluation.md §5, "Test server").

``ChatServer`` is a :class:`~http.server.ThreadingHTTPServer` on 127.0.0.1, port 0, served from a background thread;
use it as a context manager::

    with ChatServer() as server:
        server.push(429)                      # scripted replies are served first, in order
        client = ...(base_url=server.base_url)
        ...
        server.requests                       # every request: path, headers (lower-cased names), json body

* Scripted replies: :meth:`ChatServer.push` queues ``(status, headers, body)``; a status >= 400 gets the error shape
  ``{"error": {message, type, param, code}}`` unless a body is given, and ``retry-after-ms: 1`` so the client's
  retries are fast. ``sleep`` holds the reply back (to force a client timeout).
* Then the default reply: a full 200 ``chat.completion`` that echoes ``model`` and whose content is
  ``reply(last user message)`` (default :func:`default_reply`: ``"unsafe\\nS2"`` when :data:`MARKER` is in it, else
  ``"safe"``).
* ``delay`` holds every reply back that long; ``max_in_flight`` is the most requests handled at once.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

MARKER = "<<harmful>>"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 422: "unprocessable_entity", 429: "rate_limit_exceeded"}


def default_reply(last_user: str) -> str:
    """The deterministic default reply of spec §5: ``"unsafe\\nS2"`` when :data:`MARKER` is present, else ``"safe"``."""
    return "unsafe\nS2" if MARKER in last_user else "safe"


def completion_body(content: Any, model: str, prompt_tokens: int = 5, completion_tokens: int = 1) -> dict:
    """The full 200 shape of spec §5 (the client parses leniently: send every field)."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def error_body(status: int) -> dict:
    return {"error": {"message": f"scripted error {status}", "type": ERROR_TYPES.get(status, "server_error"),
                      "param": None, "code": None}}


@dataclass
class Scripted:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None  # dict/list → JSON; str/bytes → as they are; None → the default shape for the status
    sleep: float = 0.0


def last_user_message(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    users = [m.get("content") for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


class ChatServer:
    """The test server (module docstring)."""

    def __init__(self, reply: Callable[[str], str] = default_reply, delay: float = 0.0):
        self.reply, self.delay = reply, delay
        self.script: deque[Scripted] = deque()
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------------------- scripting
    def push(self, status: int = 200, body: Any = None, headers: dict[str, str] | None = None,
             sleep: float = 0.0) -> ChatServer:
        """Queue one scripted reply; errors get ``retry-after-ms: 1`` unless ``headers`` says otherwise."""
        merged = {"retry-after-ms": "1"} if status >= 400 else {}
        merged.update(headers or {})
        self.script.append(Scripted(status, merged, body, sleep))
        return self

    def next_reply(self, body: Any) -> Scripted:
        with self._lock:
            if self.script:
                return self.script.popleft()
        model = body.get("model", "") if isinstance(body, dict) else ""
        return Scripted(200, {}, completion_body(self.reply(last_user_message(body)), model))

    # -------------------------------------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Self:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # ends any sleeping reply at once
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # -------------------------------------------------------------------------------------------- handling
    def enter(self, record: dict) -> None:
        with self._lock:
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stop.wait(seconds)


def _encode(scripted: Scripted) -> tuple[bytes, str]:
    body = scripted.body if scripted.body is not None or scripted.status == 200 else error_body(scripted.status)
    if isinstance(body, bytes):
        return body, "application/json"
    if isinstance(body, str):
        return body.encode("utf-8"), "application/json"
    return json.dumps(body).encode("utf-8"), "application/json"


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = raw.decode("utf-8", "replace")
            server.enter({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                          "json": body})
            try:
                scripted = server.next_reply(body)
                server.wait(server.delay + scripted.sleep)
                self.send(scripted)
            finally:
                server.leave()

        def send(self, scripted: Scripted) -> None:
            payload, ctype = _encode(scripted)
            try:
                self.send_response(scripted.status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(payload)))
                for k, v in scripted.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


__all__ = ["MARKER", "ChatServer", "Scripted", "completion_body", "default_reply", "error_body", "last_user_message"]
