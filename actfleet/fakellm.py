"""A scripted OpenAI-compatible chat-completions server, over real HTTP.

For tests, demos and load tests: ``POST /v1/chat/completions`` (non-streaming),
``GET /v1/models``, ``GET /healthz``. Every request gets its own thread and sleeps the
configured latency, so concurrent requests do not wait for each other.

A script is a JSON list of rules; the first rule whose ``when`` holds answers::

    [
      {"when": {"prompt_regex": "Compute: (?P<expr>.+)", "turn": 1},
       "reply": "<execute>\\nprint({expr})\\n</execute>"},
      {"when": {"last_regex": "^Observation:\\n(?P<out>.*)"},
       "reply": "<solution>{out}</solution>", "latency_s": 0.2},
      {"when": {"prompt_regex": "flaky"}, "status": 500, "error": "overloaded", "times": 2}
    ]

``when`` (all given conditions must hold; an empty ``when`` always holds):
``prompt_regex`` searched in the first user message (the task prompt), ``last_regex`` in
the last message (the latest observation after turn 1), ``system_regex`` in the system
message, ``turn`` = assistant messages so far + 1. Named groups of the regexes replace
``{name}`` in the reply (other braces are left alone). Per rule, optionally: ``latency_s``,
``finish_reason``, ``headers`` (added to the response), ``status`` and ``error`` (an
error response instead of a reply; ``error`` alone means status 500), and ``times`` (the
rule fires only the first N times it matches).

Like real servers, a reply is cut before the first of the request's ``stop`` sequences
(which is dropped) and at ``max_tokens``, counting tokens as ``len(text) // 4 + 1``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NO_MATCH_REPLY = "<solution>no rule matched</solution>"
FAKE_MODEL = "actfleet-fake"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_WHEN_KEYS = {"prompt_regex", "last_regex", "system_regex", "turn"}
_RULE_KEYS = {"when", "reply", "latency_s", "status", "error", "times", "finish_reason", "headers"}


class ScriptError(ValueError):
    """A script is not valid; the message says where and what to fix."""


@dataclass(frozen=True, slots=True)
class Rule:
    reply: str = ""
    prompt_regex: re.Pattern[str] | None = None
    last_regex: re.Pattern[str] | None = None
    system_regex: re.Pattern[str] | None = None
    turn: int | None = None
    latency_s: float | None = None
    status: int | None = None
    error: str | None = None
    times: int | None = None
    finish_reason: str = "stop"
    headers: tuple[tuple[str, str], ...] = ()

    def match(self, conversation: Conversation) -> dict[str, str] | None:
        """The named groups captured when every condition holds, else ``None``."""
        if self.turn is not None and conversation.turn != self.turn:
            return None
        groups: dict[str, str] = {}
        for pattern, text in (
            (self.system_regex, conversation.system),
            (self.prompt_regex, conversation.prompt),
            (self.last_regex, conversation.last),
        ):
            if pattern is None:
                continue
            found = pattern.search(text)
            if found is None:
                return None
            groups.update({k: v or "" for k, v in found.groupdict().items()})
        return groups

    def render(self, groups: Mapping[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: groups.get(m.group(1), m.group(0)), self.reply)


@dataclass(frozen=True, slots=True)
class Conversation:
    system: str
    prompt: str
    last: str
    turn: int

    @classmethod
    def of(cls, messages: Sequence[Mapping[str, Any]]) -> Conversation:
        def text(m: Mapping[str, Any]) -> str:
            content = m.get("content")
            if isinstance(content, list):  # content parts
                return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            return content if isinstance(content, str) else ""

        by_role = collections.defaultdict(list)
        for m in messages:
            by_role[m.get("role")].append(text(m))
        return cls(
            system=next(iter(by_role["system"]), ""),
            prompt=next(iter(by_role["user"]), ""),
            last=text(messages[-1]) if messages else "",
            turn=len(by_role["assistant"]) + 1,
        )


def parse_script(raw: object) -> list[Rule]:
    """Check and build the rules of a script (already decoded from JSON)."""
    if not isinstance(raw, list):
        raise ScriptError(f"a script is a JSON list of rules, got {type(raw).__name__}")
    return [_parse_rule(i, item) for i, item in enumerate(raw)]


def load_script(path: str | Path) -> list[Rule]:
    """Read a script file; any problem (missing file, bad JSON, bad rule) is a ScriptError."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ScriptError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScriptError(f"{path} is not valid JSON: {e}") from e
    try:
        return parse_script(raw)
    except ScriptError as e:
        raise ScriptError(f"{path}: {e}") from e


def _parse_rule(i: int, item: object) -> Rule:
    where = f"rule {i}"
    if not isinstance(item, Mapping):
        raise ScriptError(f"{where}: expected an object, got {type(item).__name__}")
    unknown = set(item) - _RULE_KEYS
    if unknown:
        raise ScriptError(
            f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}"
        )
    when = item.get("when", {})
    if not isinstance(when, Mapping):
        raise ScriptError(f"{where}: 'when' must be an object")
    unknown = set(when) - _WHEN_KEYS
    if unknown:
        raise ScriptError(
            f"{where}: unknown condition(s) {sorted(unknown)}; known: {sorted(_WHEN_KEYS)}"
        )

    def regex(key: str) -> re.Pattern[str] | None:
        value = when.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ScriptError(f"{where}: when.{key} must be a string")
        try:
            return re.compile(value)
        except re.error as e:
            raise ScriptError(f"{where}: when.{key} is not a valid regex: {e}") from e

    def typed(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ScriptError(f"{where}: {key} must be {name}")
        return value

    reply = typed(item, "reply", str, "a string")
    error = typed(item, "error", str, "a string")
    status = typed(item, "status", int, "an HTTP status code")
    if status is not None and not 400 <= status <= 599:
        raise ScriptError(f"{where}: status must be an error status, 400 to 599")
    if error is not None and status is None:
        status = 500
    if reply is None and status is None:
        raise ScriptError(f"{where}: needs a 'reply' (or a 'status' / an 'error' to fail)")
    times = typed(item, "times", int, "a positive integer")
    if times is not None and times < 1:
        raise ScriptError(f"{where}: times must be a positive integer")
    latency = typed(item, "latency_s", (int, float), "a number of seconds")
    if latency is not None and latency < 0:
        raise ScriptError(f"{where}: latency_s must not be negative")
    headers = typed(item, "headers", Mapping, "an object of header names to strings") or {}
    return Rule(
        reply=reply or "",
        prompt_regex=regex("prompt_regex"),
        last_regex=regex("last_regex"),
        system_regex=regex("system_regex"),
        turn=typed(when, "turn", int, "an integer"),
        latency_s=None if latency is None else float(latency),
        status=status,
        error=error,
        times=times,
        finish_reason=typed(item, "finish_reason", str, "a string") or "stop",
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
    )


# The built-in script: solves "Compute: EXPR" tasks in two turns.
DEFAULT_SCRIPT: list[dict[str, Any]] = [
    {
        # The answer is the last line the code printed.
        "when": {"last_regex": r"^Observation:\n(?:.*\n)*?(?P<out>[^\n]*\S)\s*$"},
        "reply": "The output answers the task.\n<solution>{out}</solution>",
    },
    {
        "when": {"prompt_regex": r"(?m)Compute:\s*(?P<expr>.+?)\.?\s*$", "turn": 1},
        "reply": (
            "I will compute it with Python.\n<execute>\nresult = {expr}\nprint(result)\n</execute>"
        ),
    },
]


def count_tokens(text: str) -> int:
    return len(text) // 4 + 1


def truncate(reply: str, stop: Sequence[str], max_tokens: int | None) -> tuple[str, str | None]:
    """Cut ``reply`` as a server would: before the first stop sequence (dropped), then at
    ``max_tokens``. Returns the text and ``"length"`` if it was cut for length."""
    cuts = [i for s in stop if s and (i := reply.find(s)) >= 0]
    if cuts:
        reply = reply[: min(cuts)]
    if max_tokens is not None and count_tokens(reply) > max_tokens:
        return reply[: max(max_tokens - 1, 0) * 4], "length"
    return reply, None


class FakeLLMServer:
    """The server; ``start()`` binds and serves in a background thread. A context manager.

    ``script``: rules (``Rule`` objects or their JSON form); ``None`` = ``DEFAULT_SCRIPT``.
    ``latency_s`` applies to every reply unless its rule says otherwise. ``requests`` keeps
    the JSON bodies of the last 1000 chat requests, for tests to inspect.
    """

    def __init__(
        self,
        script: Sequence[Rule | Mapping[str, Any]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
    ) -> None:
        rules = DEFAULT_SCRIPT if script is None else script
        self.rules = [r if isinstance(r, Rule) else _parse_rule(i, r) for i, r in enumerate(rules)]
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._fired = [0] * len(self.rules)
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL for ``OPENAI_BASE_URL`` (ends in ``/v1``); valid after ``start()``."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self._httpd.server_address[1]}/v1"

    def start(self) -> str:
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="fake-llm", daemon=True
        )
        self._thread.start()
        return self.url

    def serve_forever(self) -> None:
        """Block until ``stop()`` (from another thread) or Ctrl-C."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pick(self, conversation: Conversation) -> tuple[Rule | None, dict[str, str]]:
        """The first rule that matches and may still fire (counting the firing)."""
        with self._lock:
            for i, rule in enumerate(self.rules):
                groups = rule.match(conversation)
                if groups is None:
                    continue
                if rule.times is not None and self._fired[i] >= rule.times:
                    continue
                self._fired[i] += 1
                return rule, groups
        return None, {}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: bursts of connections must not be refused
    fake: FakeLLMServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Drop kept-alive connections, so a stopped server really stops answering."""
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):  # already closed by the client
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    # Headers and body go out in separate writes: with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms a reply). Real servers set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: _HTTPServer
    timeout = 300  # an idle kept-alive connection frees its thread after this

    def log_message(self, format: str, *args: Any) -> None:
        pass  # silent: a load test would drown stderr

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            model = {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "actfleet"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no route for GET {self.path}", "not_found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route for POST {self.path}", "not_found")
            return
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._error(400, "the request body is not valid JSON")
            return
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self._error(400, "'messages' must be a list of objects")
            return
        if request.get("stream"):
            self._error(400, "streaming is not supported by the fake server; omit 'stream'")
            return
        fake = self.server.fake
        fake.requests.append(request)
        rule, groups = fake.pick(Conversation.of(messages))
        latency = fake.latency_s if rule is None or rule.latency_s is None else rule.latency_s
        if latency > 0:
            time.sleep(latency)
        headers = dict(rule.headers) if rule else {}
        if rule is not None and rule.status is not None:
            message = rule.error or _phrase(rule.status)
            self._error(rule.status, message, "fake_error", headers)
            return
        self._send(200, _completion(request, messages, rule, groups), headers)

    def _error(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _send(self, status: int, payload: object, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _completion(
    request: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    rule: Rule | None,
    groups: Mapping[str, str],
) -> dict[str, Any]:
    text = NO_MATCH_REPLY if rule is None else rule.render(groups)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]
    max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
    text, cut = truncate(text, stop, max_tokens if isinstance(max_tokens, int) else None)
    prompt_tokens = sum(count_tokens(Conversation.of([m]).last) for m in messages)
    completion_tokens = count_tokens(text)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(request.get("model") or FAKE_MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": cut or (rule.finish_reason if rule else "stop"),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
