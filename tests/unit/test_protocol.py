"""The runner protocol, host side: framing and ``SessionClient`` over a scripted fake channel."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest

from agent.errors import InfrastructureError, SandboxError
from agent.loop import run_codeact
from agent.models import FailureClass, TaskSpec
from agent.sandbox import ExecResult
from tests.fakes import ScriptedLLM
from workers.sandbox.protocol import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    RunnerDeadline,
    RunnerExited,
    RunnerProtocolError,
    SessionClient,
    encode_frame,
)

Responder = Callable[[dict[str, Any]], list[dict[str, Any]] | bytes | None]


class FakeChannel:
    """Answers each request with what ``respond`` returns; delivers bytes ``chunk`` at a time.

    ``respond`` returns messages (framed for it), raw bytes, or None for silence.
    """

    def __init__(self, respond: Responder, hello: bool = True, chunk: int = 1 << 20) -> None:
        self.respond = respond
        self.chunk = chunk
        self.sent: list[dict[str, Any]] = []
        self.pending = bytearray(encode_frame({"ready": True, "pid": 7}) if hello else b"")
        self.eof = False
        self.recv_timeouts: list[float | None] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        for request in FrameDecoder().feed(data):
            self.sent.append(request)
            answer = self.respond(request)
            if isinstance(answer, bytes):
                self.pending += answer
            elif answer is not None:
                for message in answer:
                    self.pending += encode_frame(message)

    def recv(self, max_bytes: int, timeout_s: float | None) -> bytes:
        self.recv_timeouts.append(timeout_s)
        if self.pending:
            n = min(max_bytes, self.chunk)
            data = bytes(self.pending[:n])
            del self.pending[:n]
            return data
        if self.eof:
            return b""
        raise TimeoutError

    def close(self) -> None:
        self.closed = True


def echo_exec(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": request["id"], "stdout": request.get("code", ""), "value": "2"}]


# -- framing ----------------------------------------------------------------------------


def test_a_frame_is_a_big_endian_length_then_utf8_json() -> None:
    frame = encode_frame({"op": "ping", "text": "é"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:].decode("utf-8")) == {"op": "ping", "text": "é"}


def test_decoder_reassembles_frames_split_at_any_byte() -> None:
    stream = encode_frame({"a": 1}) + encode_frame({"b": "ü" * 100})
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == [{"a": 1}, {"b": "ü" * 100}]
    assert decoder.pending == 0


def test_decoder_returns_every_whole_frame_in_one_chunk_and_keeps_the_rest() -> None:
    third = encode_frame({"n": 3})
    decoder = FrameDecoder()
    stream = encode_frame({"n": 1}) + encode_frame({"n": 2}) + third[:5]
    assert decoder.feed(stream) == [{"n": 1}, {"n": 2}]
    assert decoder.pending == 5
    assert decoder.feed(third[5:]) == [{"n": 3}]


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", MAX_FRAME_BYTES + 1),
        struct.pack(">I", 3) + b"{x}",
        struct.pack(">I", 2) + b"\xff\xfe",
        struct.pack(">I", 2) + b"[]",
    ],
    ids=["oversized", "bad-json", "bad-utf8", "not-an-object"],
)
def test_decoder_rejects_garbage_with_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(RunnerProtocolError):
        FrameDecoder().feed(raw)


class ClientSandbox:
    """A sandbox that is nothing but a ``SessionClient`` (no restart), to see what the agent
    loop makes of each way the runner can break the protocol."""

    def __init__(self, client: SessionClient) -> None:
        self.client = client

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        return self.client.execute(code, timeout_s, max_output_chars)

    def close(self) -> None:
        pass


def silent(request: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(
    ("respond", "eof", "error"),
    [
        (silent, False, RunnerDeadline),
        (silent, True, RunnerExited),
        (lambda request: struct.pack(">I", 1) + b"x", False, RunnerProtocolError),
    ],
    ids=["no-answer", "eof", "garbage"],
)
def test_a_broken_runner_ends_the_attempt_as_a_retryable_sandbox_fault(
    respond: Responder, eof: bool, error: type[Exception]
) -> None:
    # Given a task whose model asks to run code, in a sandbox whose runner then breaks
    now = [100.0]
    channel = FakeChannel(respond)
    client = SessionClient(channel, grace_s=0.0, clock=lambda: now[0])
    client.wait_ready(1.0)
    channel.eof = eof
    llm = ScriptedLLM(["<execute>print(1)</execute>", "<solution>1</solution>"])
    loop = run_codeact(TaskSpec(prompt="p"), llm, ClientSandbox(client), model="m")
    # When the loop runs the code
    with pytest.raises(InfrastructureError) as raised:
        for _ in loop:
            pass
    # Then the fault is ours, not the model's: it is not shown to the model as an
    # observation (no second request), it ends the attempt for the caller to retry, and the
    # task's failure class, should the retries run out, is sandbox_error
    assert isinstance(raised.value, error)
    assert isinstance(raised.value, SandboxError)
    assert len(llm.requests) == 1
    assert FailureClass.of_fault(raised.value) is FailureClass.SANDBOX_ERROR


# -- SessionClient -------------------------------------------------------------------------


def test_wait_ready_returns_the_hello_frame() -> None:
    client = SessionClient(FakeChannel(echo_exec))
    assert client.wait_ready(1.0) == {"ready": True, "pid": 7}


def test_wait_ready_rejects_a_first_frame_that_is_not_ready() -> None:
    channel = FakeChannel(echo_exec, hello=False)
    channel.pending += encode_frame({"hello": "world"})
    with pytest.raises(RunnerProtocolError):
        SessionClient(channel).wait_ready(1.0)


def test_execute_sends_the_request_and_maps_the_answer_to_an_exec_result() -> None:
    channel = FakeChannel(echo_exec, chunk=3)
    client = SessionClient(channel)
    client.wait_ready(1.0)

    result = client.execute("1 + 1", timeout_s=5.0, max_output_chars=100)

    assert channel.sent == [
        {"op": "exec", "id": 1, "code": "1 + 1", "timeout_s": 5.0, "max_output_chars": 100}
    ]
    assert result.stdout == "1 + 1"
    assert result.value == "2"
    assert result.ok


def test_execute_skips_answers_to_earlier_requests() -> None:
    def late(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": request["id"] - 1, "stdout": "stale"}, *echo_exec(request)]

    client = SessionClient(FakeChannel(late))
    client.wait_ready(1.0)
    assert client.execute("fresh", 1.0, 100).stdout == "fresh"


def test_execute_waits_timeout_plus_grace_then_raises_runner_deadline() -> None:
    now = [100.0]
    channel = FakeChannel(lambda request: None)
    client = SessionClient(channel, grace_s=1.5, clock=lambda: now[0])
    client.wait_ready(1.0)

    with pytest.raises(RunnerDeadline):
        client.execute("while True: pass", timeout_s=2.0, max_output_chars=100)

    assert channel.recv_timeouts[-1] == pytest.approx(3.5)


def test_execute_raises_runner_exited_when_the_channel_reaches_eof() -> None:
    channel = FakeChannel(lambda request: None)
    client = SessionClient(channel)
    client.wait_ready(1.0)
    channel.eof = True
    with pytest.raises(RunnerExited):
        client.execute("import os; os._exit(1)", 1.0, 100)


def test_execute_raises_a_protocol_error_on_garbage() -> None:
    client = SessionClient(FakeChannel(lambda request: struct.pack(">I", 1) + b"x"))
    client.wait_ready(1.0)
    with pytest.raises(RunnerProtocolError):
        client.execute("x", 1.0, 100)


def test_put_file_sends_base64_and_raises_value_error_when_refused() -> None:
    def refuse_dotdot(request: dict[str, Any]) -> list[dict[str, Any]]:
        ok = ".." not in request["path"]
        return [{"id": request["id"], "ok": ok, "error": None if ok else "no '..'"}]

    channel = FakeChannel(refuse_dotdot)
    client = SessionClient(channel)
    client.wait_ready(1.0)

    client.put_file("data/a.txt", b"hello")
    assert channel.sent[-1]["content_b64"] == "aGVsbG8="
    with pytest.raises(ValueError, match=r"no '\.\.'"):
        client.put_file("../escape", b"x")


def test_text_utf8_cannot_carry_arrives_replaced_not_as_a_protocol_error() -> None:
    # Given frames with a lone surrogate: raw, as the runner passes a traceback's text
    # through (surrogatepass), and escaped, as code writing to the channel could send it
    raw = b'{"id":1,"error":"ValueError: ' + "\udfff".encode("utf-8", "surrogatepass") + b'"}'
    escaped = b'{"id":2,"stdout":"a\\udfffb","note":["\\ud800"]}'
    frames = b"".join(struct.pack(">I", len(b)) + b for b in (raw, escaped))
    # When the host decodes them
    first, second = FrameDecoder().feed(frames)
    # Then each is a message whose text can be encoded, the bad part shown as U+FFFD
    assert first["error"].startswith("ValueError: \ufffd")
    assert second == {"id": 2, "stdout": "a\ufffdb", "note": ["\ufffd"]}
    json.dumps(second, ensure_ascii=False).encode("utf-8")
