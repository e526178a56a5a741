"""OpenAILLM against the real fake server over HTTP: replies, retries, refusals, timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from actfleet.fakellm import FakeLLMServer
from agent.errors import LLMError, LLMRejected
from agent.llm import LLMRequest
from tests.conftest import free_port
from workers.llm import OpenAILLM, ServerAnswer, Transport

PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def request(**overrides: object) -> LLMRequest:
    fields: dict[str, object] = {"model": "fake-model", "messages": PROMPT}
    fields.update(overrides)
    return LLMRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture(params=["wire", "sdk"])
def transport(request: pytest.FixtureRequest) -> Transport:
    """Each test runs over both ways a request can go: the kept-alive wire, and the SDK's
    own HTTP stack (taken behind a proxy or with SDK-managed credentials)."""
    param: Transport = request.param
    return param


def make_llm(
    server: FakeLLMServer, sleeps: list[float], transport: Transport, **kwargs: object
) -> OpenAILLM:
    options: dict[str, object] = {
        "base_url": server.url,
        "max_retries": 3,
        "sleep": sleeps.append,
        "transport": transport,
    }
    options.update(kwargs)
    return OpenAILLM(**options)  # type: ignore[arg-type]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    script: list[dict[str, Any]] = [
        {"when": {"prompt_regex": "flaky"}, "status": 500, "error": "overloaded", "times": 2},
        {"when": {"prompt_regex": "flaky"}, "reply": "recovered"},
        {
            "when": {"prompt_regex": "busy"},
            "status": 429,
            "error": "slow down",
            "headers": {"Retry-After": "0.2"},
            "times": 1,
        },
        {"when": {"prompt_regex": "busy"}, "reply": "thanks for waiting"},
        {"when": {"prompt_regex": "forbidden"}, "status": 400, "error": "model 'x' not found"},
        {"when": {"prompt_regex": "broken"}, "status": 503, "error": "down for maintenance"},
        {"when": {"prompt_regex": "slow"}, "reply": "finally", "latency_s": 2.0},
        {
            "when": {"prompt_regex": "code"},
            "reply": "Let me run it.\n<execute>\nprint(1)\n</execute>",
        },
        {"reply": "Hi there, how can I help?"},
    ]
    with FakeLLMServer(script) as s:
        yield s


def test_reply_with_usage_and_latency(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    seen: list[tuple[str, float, int, int]] = []
    llm = make_llm(server, sleeps, transport, on_response=lambda *a: seen.append(a))

    reply = llm.complete(request(temperature=0.5, max_tokens=77, seed=7))

    assert reply.content == "Hi there, how can I help?"
    assert reply.finish_reason == "stop"
    assert reply.prompt_tokens == (len("be brief") // 4 + 1) + (len("hello") // 4 + 1)
    assert reply.completion_tokens == len(reply.content) // 4 + 1
    assert reply.latency_s > 0
    # the request carried the parameters, and the metrics hook saw the call
    sent = server.requests[-1]
    assert (sent["model"], sent["temperature"], sent["max_tokens"], sent["seed"]) == (
        "fake-model",
        0.5,
        77,
        7,
    )
    assert "stop" not in sent  # no stop sequences: the field is omitted, not null
    assert len(seen) == 1
    model, seconds, prompt_tokens, completion_tokens = seen[0]
    assert model == "fake-model" and seconds > 0
    assert (prompt_tokens, completion_tokens) == (reply.prompt_tokens, reply.completion_tokens)


def test_stop_sequence_is_stripped_by_the_server(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport)
    msgs = [{"role": "user", "content": "run code"}]

    reply = llm.complete(request(messages=msgs, stop=("</execute>",)))

    assert server.requests[-1]["stop"] == ["</execute>"]
    assert reply.content == "Let me run it.\n<execute>\nprint(1)\n"  # returned as-is


def test_retries_server_errors_then_succeeds(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport)

    reply = llm.complete(request(messages=[{"role": "user", "content": "flaky"}]))

    assert reply.content == "recovered"
    assert len(server.requests) == 3  # two 500s, then the reply
    assert len(sleeps) == 2  # one backoff before each retry
    assert all(0 <= s <= 1.0 for s in sleeps)  # full jitter under 0.5 s * 2**(retry-1)


def test_honours_retry_after_on_429(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport)

    reply = llm.complete(request(messages=[{"role": "user", "content": "busy"}]))

    assert reply.content == "thanks for waiting"
    assert sleeps == [0.2]


def test_client_error_is_rejected_without_retry(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport)

    with pytest.raises(LLMRejected, match=r"HTTP 400.*model 'x' not found") as info:
        llm.complete(request(messages=[{"role": "user", "content": "forbidden"}]))

    assert len(server.requests) == 1 and sleeps == []
    assert info.value.retryable is False
    cause = info.value.__cause__  # the server's answer is chained, not lost
    assert isinstance(cause, ServerAnswer) and cause.answer.status == 400


def test_persistent_server_errors_exhaust_retries(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport, max_retries=2)

    with pytest.raises(LLMError, match=r"gave up after 3 attempts.*503.*maintenance") as info:
        llm.complete(request(messages=[{"role": "user", "content": "broken"}]))

    assert not isinstance(info.value, LLMRejected)
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_server_down_is_an_llm_error_after_retries(
    sleeps: list[float], transport: Transport
) -> None:
    llm = OpenAILLM(
        base_url=f"http://127.0.0.1:{free_port()}/v1",
        max_retries=2,
        sleep=sleeps.append,
        transport=transport,
    )

    with pytest.raises(LLMError, match=r"gave up after 3 attempts.*connection failed"):
        llm.complete(request())

    assert len(sleeps) == 2


def test_request_timeout_is_enforced(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    llm = make_llm(server, sleeps, transport, timeout_s=0.3, max_retries=1)
    started = time.monotonic()

    with pytest.raises(LLMError, match=r"no reply within 0.3s"):
        llm.complete(request(messages=[{"role": "user", "content": "slow"}]))

    assert time.monotonic() - started < 1.5  # two attempts of 0.3 s, not 2 s each
    assert len(sleeps) == 1


def test_the_tasks_remaining_time_caps_the_request(
    server: FakeLLMServer, sleeps: list[float], transport: Transport
) -> None:
    # given a generous adapter timeout, but only 0.3 s left on the task's wall clock
    llm = make_llm(server, sleeps, transport, timeout_s=60.0)
    started = time.monotonic()

    with pytest.raises(LLMError):
        llm.complete(request(messages=[{"role": "user", "content": "slow"}], timeout_s=0.3))

    # then it gives up within that budget instead of retrying past it
    assert time.monotonic() - started < 1.5


def test_reads_the_sdk_environment_and_needs_no_key(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    llm = OpenAILLM()

    assert llm.base_url.rstrip("/") == server.url
    assert llm.complete(request()).content == "Hi there, how can I help?"


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"object": "error"}', b'{"choices": []}', b'{"choices": [{"message": 3}]}'],
)
def test_a_200_that_is_no_completion_is_an_llm_error(
    body: bytes, sleeps: list[float], transport: Transport
) -> None:
    # given a server that answers 200 with something other than a chat completion
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with HTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        llm = OpenAILLM(base_url=url, max_retries=3, sleep=sleeps.append, transport=transport)
        # then the adapter says so, without retrying a reply that will not change
        with pytest.raises(LLMError, match="holds no completion"):
            llm.complete(request())
        httpd.shutdown()
    assert sleeps == []


def test_requests_go_through_the_sdk_where_a_proxy_is_configured(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert OpenAILLM(base_url=server.url).transport == "wire"

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert OpenAILLM(base_url=server.url).transport == "sdk"

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the server is exempt: straight there
    assert OpenAILLM(base_url=server.url).transport == "wire"


def test_a_reply_with_text_utf8_cannot_encode_is_cleaned(sleeps: list[float]) -> None:
    # Given a model server whose JSON reply escapes a lone surrogate (\ud800)
    from agent.events import Event, EventType

    with FakeLLMServer([{"reply": "the answer \ud800 is 42"}]) as server:
        for transport in ("wire", "sdk"):
            llm = make_llm(server, sleeps, transport)  # type: ignore[arg-type]
            reply = llm.complete(request())
            # Then the reply has U+FFFD in its place, and its event can be stored
            assert reply.content == "the answer \ufffd is 42"
            Event(EventType.LLM_REPLY, 1, 1, 0.0, {"content": reply.content}).to_json().encode()
