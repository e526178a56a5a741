"""The LLM adapter: ``agent.llm.LLM`` over any OpenAI-compatible chat-completions server.

One ``OpenAILLM`` (one ``openai.OpenAI`` client and one pool of connections) is shared by
every agent loop of a worker process; it is thread-safe. Retries are ours alone (the SDK's are
off): 429, 408, 5xx, connection errors and timeouts are retried with exponential backoff and
full jitter (or the server's ``Retry-After``), up to ``max_retries`` times and never past
the request's own ``timeout_s``. Other 4xx raise ``LLMRejected``; retries used up raise
``LLMError``. SDK exceptions never leave this module untranslated.

With a ``gate`` (``workers.modelgate``: the fleet-wide cap on the server's in-flight
requests) a completion holds one of its slots from its first exchange to its last, backoffs
included, and tells it how each exchange went, so the fleet's limit adapts. The server being busy (a 429, or a 503
with ``Retry-After``) then means "wait", not "fail": such answers are retried, honouring
``Retry-After``, until the request's deadline without counting against ``max_retries``,
and a request whose deadline passes while it waits (for a slot or for the server) raises
``LLMError`` only once the deadline has passed, so the task ends ``timed_out``, never
``llm_error``, for want of capacity.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Literal

import openai

from agent.backoff import Backoff, Jitter, parse_retry_after
from agent.errors import LLMError, LLMRejected
from agent.llm import LLMReply, LLMRequest
from agent.text import replace_unencodable
from workers.modelgate import GateTimeout, ModelGate, Outcome
from workers.modelwire import Answer, Wire, WireFailed, WireTimeout

# Called after every successful request: (model, seconds, prompt_tokens, completion_tokens).
OnResponse = Callable[[str, float, int, int], None]

PLACEHOLDER_API_KEY = "sk-none"  # local servers ignore the key, but the SDK insists on one
RETRYABLE_STATUSES = frozenset({408, 429})
Transport = Literal["wire", "sdk"]


class ServerAnswer(Exception):
    """An HTTP answer that is no completion (its status, headers and body in ``answer``),
    chained under the ``LLMError`` it led to."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"HTTP {answer.status}: {_server_message(answer.body)}")
        self.answer = answer


class OpenAILLM:
    """``LLM`` for any OpenAI-compatible chat-completions server, configured by the
    ``openai`` SDK.

    ``base_url`` / ``api_key`` default to the SDK's ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``;
    without any key a placeholder is sent, so keyless local servers work. ``timeout_s``
    bounds each HTTP request (and is further cut to what is left of ``request.timeout_s``).
    ``on_response`` observes each successful request, e.g. for metrics; it must not raise.

    The SDK client decides the URL and every header (auth, user agent, platform headers).
    The requests go over ``workers.modelwire`` (kept-alive ``http.client`` connections: a
    fifth of the SDK's CPU per call), except where the SDK must handle them itself: an
    HTTP proxy configured for the server's URL, or SDK-managed credentials (no API-key
    header); ``transport`` forces one ("wire" or "sdk").

    ``gate`` (``workers.modelgate.ModelGate``, or None for none) is the fleet-wide cap on
    the server's in-flight requests; the worker sets it before the first request.

    ``LLMReply.latency_s`` is the wall clock of the whole ``complete`` call, the wait for a
    slot, retries and backoff included; ``on_response`` gets the duration of the successful
    request alone.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_response: OnResponse | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: Transport | None = None,
        gate: ModelGate | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        key = api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff = Backoff(backoff_base_s, backoff_max_s, Jitter.FULL)
        self.on_response = on_response
        self.gate = gate  # set before the first request, or never
        self._sleep = sleep
        # Builds an httpx client (no network I/O); base_url=None lets the SDK read the env.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0
        )
        url = str(self._client.base_url.join("chat/completions"))
        headers = {**self._client.default_headers, **self._client.auth_headers}
        if transport is None:
            sdk_only = _proxied(url) or "Authorization" not in headers
            transport = "sdk" if sdk_only else "wire"
        self.transport: Transport = transport
        self._wire: Wire | None = None
        if transport == "wire":
            self._wire = Wire(url, {k: v for k, v in headers.items() if isinstance(v, str)})

    @property
    def base_url(self) -> str:
        return str(self._client.base_url)

    def close(self) -> None:
        if self._wire is not None:
            self._wire.close()
        self._client.close()

    def complete(self, request: LLMRequest) -> LLMReply:
        started = time.monotonic()
        deadline = None if request.timeout_s is None else started + request.timeout_s
        gate = self.gate
        if gate is None:
            return self._complete(request, started, deadline, None, 0)
        try:
            token = gate.acquire(deadline)
        except GateTimeout as e:
            raise LLMError(
                f"{request.model}: the request's time budget ran out waiting for a slot ({e})"
            ) from None
        try:
            return self._complete(request, started, deadline, gate, token)
        finally:
            gate.release()

    def _complete(
        self,
        request: LLMRequest,
        started: float,
        deadline: float | None,
        gate: ModelGate | None,
        token: int,
    ) -> LLMReply:
        """The exchanges and backoffs of one completion; under a gate, holding its slot
        throughout: a request backing off from a busy server keeps its slot, so the fleet
        sends no other request into that server in its place."""
        retry = 0  # failed exchanges counted against max_retries
        waits = 0  # "busy" answers under a gate: retried until the deadline, not counted
        while True:
            timeout = self.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise LLMError(f"{request.model}: the request's time budget ran out")
            sent = time.monotonic()
            try:
                outcome: Answer | WireTimeout | WireFailed = self._send(request, timeout)
            except (WireTimeout, WireFailed) as e:
                outcome = e
            if gate is not None:
                gate.observe(token, _gate_outcome(outcome, timeout >= self.timeout_s))
            if isinstance(outcome, Answer):
                if 200 <= outcome.status < 300:
                    return self._reply(request.model, outcome.body, sent, started)
                failure: Exception = ServerAnswer(outcome)
                reason = str(failure)
                if outcome.status < 500 and outcome.status not in RETRYABLE_STATUSES:
                    raise LLMRejected(
                        f"{request.model}: the server refused the request ({reason})"
                    ) from failure
                retry_after = parse_retry_after(outcome.headers)
            else:
                failure, reason, retry_after = outcome, str(outcome), None

            busy = gate is not None and deadline is not None and _busy(outcome, retry_after)
            if busy:
                waits += 1
            else:
                retry += 1
                if retry > self.max_retries:
                    raise LLMError(
                        f"{request.model}: gave up after {retry} attempts; last: {reason}"
                    ) from failure
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            delay = self.backoff.delay_within_s(
                waits if busy else retry, remaining, retry_after_s=retry_after
            )
            if delay is None:
                if busy:  # waiting out the budget makes the task time out, not fail
                    self._sleep(max(remaining, 0.0))
                    raise LLMError(
                        f"{request.model}: the request's time budget ran out while the "
                        f"server was busy; last: {reason}"
                    ) from failure
                raise LLMError(
                    f"{request.model}: the request's time budget ran out after {retry} "
                    f"attempts; last: {reason}"
                ) from failure
            self._sleep(delay)

    def _send(self, request: LLMRequest, timeout: float) -> Answer:
        """One HTTP exchange: the server's answer whatever its status, or ``WireTimeout`` /
        ``WireFailed`` when there is none."""
        if self._wire is not None:
            return self._wire.post(_json(_body(request)), timeout)
        try:
            # The SDK's low-level post rather than chat.completions.create(): create()
            # re-walks every message through its TypedDict transforms on each call, and
            # building the pydantic ChatCompletion costs another third of the call's CPU.
            raw = self._client.post(
                "/chat/completions",
                cast_to=bytes,
                body=_body(request),
                options={"timeout": timeout},
            )
        except openai.APIStatusError as e:
            headers = {k.lower(): v for k, v in e.response.headers.items()}
            return Answer(e.status_code, headers, e.response.content)
        except openai.APITimeoutError as e:
            raise WireTimeout(f"no reply within {timeout:.3g}s") from e
        except openai.APIConnectionError as e:
            raise WireFailed(f"connection failed: {_cause(e)}") from e
        except openai.OpenAIError as e:  # anything else the SDK raises, e.g. from its auth
            raise LLMError(f"{request.model}: the SDK failed the request: {e}") from e
        return Answer(200, {}, raw)

    def _reply(self, model: str, raw: bytes, sent: float, started: float) -> LLMReply:
        now = time.monotonic()
        try:
            completion = json.loads(raw)
            choice = completion["choices"][0]
            content = choice["message"].get("content") or ""
            finish_reason = choice.get("finish_reason")
            usage = completion.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            if not isinstance(content, str):
                raise TypeError(f"message.content is {type(content).__name__}, not a string")
            # JSON's \ud800 escape carries text UTF-8 cannot encode: it would fail the
            # stream append of this reply, and every retry of it.
            content = replace_unencodable(content)
            if isinstance(finish_reason, str):
                finish_reason = replace_unencodable(finish_reason)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise LLMError(f"{model}: the server's reply holds no completion ({e!r})") from e
        if self.on_response is not None:
            self.on_response(model, now - sent, prompt_tokens, completion_tokens)
        return LLMReply(
            content=content,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=now - started,
        )


def _busy(outcome: Answer | Exception, retry_after: float | None) -> bool:
    """Whether the server said it is busy and to come back: a 429, or a 503 that says when
    (a bare 503 may be an outage, which counts against the retries like any failure)."""
    if not isinstance(outcome, Answer):
        return False
    return outcome.status == 429 or (outcome.status == 503 and retry_after is not None)


def _gate_outcome(outcome: Answer | Exception, full_timeout: bool) -> Outcome:
    """What an exchange tells the gate about the server's load. A timeout is an overload
    signal only when the request had the whole adapter timeout, not the task's last few
    seconds."""
    if isinstance(outcome, Answer):
        if 200 <= outcome.status < 300:
            return Outcome.OK
        if outcome.status == 429:
            return Outcome.THROTTLED
        if outcome.status == 503:
            return Outcome.UNAVAILABLE
        return Outcome.FAILED
    if isinstance(outcome, WireTimeout) and full_timeout:
        return Outcome.TIMEOUT
    return Outcome.FAILED


def _proxied(url: str) -> bool:
    """Whether the environment sends requests for ``url`` through a proxy."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if parts.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(parts.netloc)


def _server_message(body: bytes) -> str:
    """What the server said: the ``error.message`` of an OpenAI-style body, else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error", data)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str) and inner["message"]:
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
    return body.decode("utf-8", "replace").strip()[:500] or "(no body)"


def _cause(e: BaseException) -> str:
    """The innermost cause's text: the SDK's own message is just "Connection error."."""
    inner: BaseException = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return str(inner) or type(inner).__name__


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _body(request: LLMRequest) -> dict[str, object]:
    body: dict[str, object] = {
        "model": request.model,
        "messages": [dict(m) for m in request.messages],
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    return body
