"""A scripted OpenAI-compatible chat-completions server, over real HTTP.

For tests, demos and load tests: ``POST /v1/chat/completions`` (non-streaming),
``GET /v1/models``, ``GET /healthz``. Replies wait out the configured latency without
blocking one another, so concurrent requests do not wait for each other.

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
error response instead of a reply; ``error`` alone means status 500), ``times`` (the
rule fires only the first N times it matches) and ``ignore_stop`` (true: send the whole
reply whatever the request's stop sequences, as some servers do).

Like real servers, a reply is cut before the first of the request's ``stop`` sequences
(which is dropped) and at ``max_tokens``, counting tokens as ``len(text) // 4 + 1``.

With a ``capacity`` of K, like a model server with K batch slots behind a rate limiter, at
most K chat requests are in service at once (from arrival until the reply is written); one
arriving beyond that is answered at once with 429 and ``Retry-After``, and uses up nothing
of the script.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, NamedTuple

NO_MATCH_REPLY = "<solution>no rule matched</solution>"
FAKE_MODEL = "actfleet-fake"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_WHEN_KEYS = {"prompt_regex", "last_regex", "system_regex", "turn"}
_RULE_KEYS = {
    "when",
    "reply",
    "latency_s",
    "status",
    "error",
    "times",
    "finish_reason",
    "headers",
    "ignore_stop",
}


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
    ignore_stop: bool = False

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
    ignore_stop = item.get("ignore_stop", False)
    if not isinstance(ignore_stop, bool):
        raise ScriptError(f"{where}: ignore_stop must be true or false")
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
        ignore_stop=ignore_stop,
    )


# The built-in script: solves "Compute: EXPR" tasks in two turns.
DEFAULT_SCRIPT: list[dict[str, Any]] = [
    {
        # The answer is the last line the code printed (the loop's notes, in brackets,
        # come after it).
        "when": {
            "last_regex": (
                r"^Observation:\n(?:.*\n)*?(?P<out>(?!\[[A-Z])[^\n]*\S)\s*(?:\n\[[A-Z][^\n]*\]\s*)*$"
            )
        },
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
    the JSON bodies of the last 1000 chat requests, for tests to inspect. ``late_s`` keeps,
    for the last 100,000 replies sent, how long after its latency each went out (the server's own lateness,
    which benchmarks must not blame on the client).

    ``capacity``: at most this many chat requests in service at once, the rest answered 429
    with ``Retry-After: retry_after_s`` (None: no limit). ``served``, ``rejected``,
    ``peak_in_service`` and ``busy_s`` (the sum of the admitted requests' times in service)
    count what happened.

    One asyncio loop in one thread serves every connection: a thread per connection spent
    most of its CPU fighting over the GIL once a load test kept a hundred of them open.
    """

    def __init__(
        self,
        script: Sequence[Rule | Mapping[str, Any]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        capacity: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1")
        if retry_after_s < 0:
            raise ValueError("retry_after_s must not be negative")
        rules = DEFAULT_SCRIPT if script is None else script
        self.rules = [r if isinstance(r, Rule) else _parse_rule(i, r) for i, r in enumerate(rules)]
        self.host = host
        self.port = port
        self.latency_s = latency_s
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.late_s: collections.deque[float] = collections.deque(maxlen=100_000)
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.in_service = 0
        self.peak_in_service = 0
        self.served = 0
        self.rejected = 0
        self.busy_s = 0.0
        self._fired = [0] * len(self.rules)
        self._lock = threading.Lock()
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._request_stop: Callable[[], object] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        """The base URL for ``OPENAI_BASE_URL`` (ends in ``/v1``); valid after ``start()``."""
        if self._bound_port is None:
            raise RuntimeError("the server is not started")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self._bound_port}/v1"

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        # Bound here, not in the loop's thread, so that "address in use" raises to the caller.
        sock = socket.create_server((self.host, self.port), backlog=_BACKLOG)
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(target=self._run, args=(sock, started), name="fake-llm")
        thread.daemon = True
        thread.start()
        try:
            started.result()
        except BaseException:
            thread.join()
            raise
        self._thread = thread
        self._bound_port = sock.getsockname()[1]
        return self.url

    def serve_forever(self) -> None:
        """Block until ``stop()`` (from another thread) or Ctrl-C."""
        # Joined in slices: an unbounded join would hold off Ctrl-C's KeyboardInterrupt.
        while (thread := self._thread) is not None and thread.is_alive():
            thread.join(0.5)

    def stop(self) -> None:
        """Stop serving and drop kept-alive connections, so clients see the server gone."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._bound_port = None
        if self._request_stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._request_stop()
        thread.join(5)

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

    def _run(self, sock: socket.socket, started: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._serve(sock, started))
        except BaseException as e:
            if started.done():
                raise  # a crash while serving: the thread reports it
            started.set_exception(e)  # a failure to start: start() raises it
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._converse, sock=sock, backlog=_BACKLOG, limit=_MAX_HEAD
        )
        self._request_stop = functools.partial(loop.call_soon_threadsafe, stopping.set)
        started.set_result(None)
        await stopping.wait()
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer a connection's requests one at a time, so pipelined replies keep their order.

        asyncio's TCP transports already set TCP_NODELAY: each reply is one write that must
        not wait for the client's delayed ACK.
        """
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as e:
                    writer.write(_encode(e.reply, close=True))
                    break
                if request is None:
                    break
                received = time.monotonic()
                reply = self._answer(request)
                # Other methods get a 501 with a body, which a HEAD client would not read.
                keep_alive = request.keep_alive and request.method in ("GET", "POST")
                try:
                    data = _encode(reply, close=not keep_alive)
                    if reply.delay_s > 0:
                        # Encoded before the wait: when a burst of replies falls due
                        # together, each has only its write left, so none goes out late. The
                        # wait is for what is left of the latency: reading the rules and
                        # rendering the reply are part of the model's time, not added to it.
                        await asyncio.sleep(received + reply.delay_s - time.monotonic())
                    writer.write(data)
                finally:
                    if reply.in_service:
                        self.in_service -= 1
                        self.busy_s += time.monotonic() - received
                self.late_s.append(time.monotonic() - received - reply.delay_s)
                if not keep_alive:
                    break
                await writer.drain()
        except ConnectionError:
            pass  # the client left; nobody is waiting for an answer
        except asyncio.CancelledError:
            # stop(): drop the connection without flushing. Not re-raised: on Python 3.11
            # a cancelled connection task makes asyncio log a spurious error.
            writer.transport.abort()
        finally:
            self._connections.discard(task)
            writer.close()

    def _answer(self, request: _Request) -> _Reply:
        path = request.target.partition("?")[0].rstrip("/")
        if request.method == "GET":
            if path == "/healthz":
                return _Reply(200, {"status": "ok"})
            if path == "/v1/models":
                model = {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "actfleet"}
                return _Reply(200, {"object": "list", "data": [model]})
            return _failure(404, f"no route for GET {request.target}", "not_found")
        if request.method != "POST":
            return _failure(501, f"unsupported method {request.method}")
        if path != "/v1/chat/completions":
            return _failure(404, f"no route for POST {request.target}", "not_found")
        try:
            body = json.loads(request.body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _failure(400, "the request body is not valid JSON")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return _failure(400, "'messages' must be a list of objects")
        if body.get("stream"):
            return _failure(400, "streaming is not supported by the fake server; omit 'stream'")
        if self.capacity is not None and self.in_service >= self.capacity:
            self.rejected += 1
            after = (("Retry-After", f"{self.retry_after_s:g}"),)
            message = f"at capacity ({self.capacity} requests in service); retry later"
            return _failure(429, message, "rate_limit_exceeded", after)
        self.requests.append(body)
        rule, groups = self.pick(Conversation.of(messages))
        latency = self.latency_s if rule is None or rule.latency_s is None else rule.latency_s
        headers = rule.headers if rule else ()
        if rule is not None and rule.status is not None:
            message = rule.error or _phrase(rule.status)
            reply = _failure(rule.status, message, "fake_error", headers, latency)
        else:
            reply = _Reply(200, _completion(body, messages, rule, groups), headers, latency)
        self.in_service += 1  # _converse takes it off once the reply is written
        self.peak_in_service = max(self.peak_in_service, self.in_service)
        self.served += 1
        return reply._replace(in_service=True)


_BACKLOG = 1024  # bursts of connections must not be refused
_MAX_HEAD = 64 * 1024  # request line and headers
_MAX_BODY = 64 * 1024 * 1024  # beyond this, a Content-Length is a broken client's


class _Request(NamedTuple):
    method: str
    target: str
    keep_alive: bool
    body: bytes


class _Reply(NamedTuple):
    status: int
    payload: object
    headers: Sequence[tuple[str, str]] = ()
    delay_s: float = 0.0  # the model's latency: how long to wait before sending
    in_service: bool = False  # it holds one of the server's capacity slots until written


def _failure(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: Sequence[tuple[str, str]] = (),
    delay_s: float = 0.0,
) -> _Reply:
    error = {"message": message, "type": kind, "code": status}
    return _Reply(status, {"error": error}, headers, delay_s)


class _BadRequest(Exception):
    """A request that cannot be framed: answered with ``reply``, then the connection closes
    (where the next request would start is unknown)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reply = _failure(status, message)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on a connection; ``None`` when the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(f"the request line and headers exceed {_MAX_HEAD} bytes") from None
    # Blank lines before a request are allowed (RFC 9112 2.2), e.g. after a body.
    request_line, *lines = head[:-4].decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts) or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(f"malformed request line {request_line[:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(f"malformed header line {line[:100]!r}")
        name, value = name.lower(), value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "transfer-encoding" in headers:
        raise _BadRequest("chunked request bodies are not supported; send Content-Length", 411)
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        raise _BadRequest(f"invalid Content-Length {length[:100]!r}")
    if int(length) > _MAX_BODY:
        raise _BadRequest(f"the request body exceeds {_MAX_BODY} bytes", 413)
    try:
        body = await reader.readexactly(int(length))
    except asyncio.IncompleteReadError:
        return None
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # HTTP/1.0 keep-alive is opt-in and needs more headers; none of our clients use it.
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    return _Request(method, target, keep_alive, body)


def _encode(reply: _Reply, *, close: bool) -> bytes:
    """The whole response in one buffer, for one write."""
    body = json.dumps(reply.payload).encode()
    lines = [
        f"HTTP/1.1 {reply.status} {_phrase(reply.status)}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in reply.headers),
        *(["Connection: close"] if close else []),
    ]
    # "replace": a script's non-Latin-1 header value must not kill the connection
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


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
    stop = [] if rule is not None and rule.ignore_stop else request.get("stop") or []
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
