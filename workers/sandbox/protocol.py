"""The host side of the runner protocol, shared by every sandbox backend.

The in-sandbox runner (``sandbox_images/python/runner.py``) speaks length-prefixed JSON:
each frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8
JSON. A backend (bubblewrap, Docker, ...) only has to supply a ``Channel``: something that
moves bytes to the runner's stdin and from its stdout. ``SessionClient`` does the rest::

    channel = PipeChannel.for_process(proc)       # or a Docker attach socket, ...
    client = SessionClient(channel)
    client.wait_ready(timeout_s=10)                # -> the runner's hello frame
    client.put_file("data/input.csv", b"...")
    result = client.execute("x = 1\\nx + 1", timeout_s=30, max_output_chars=2000)

``execute`` waits until ``timeout_s + grace_s``: the runner interrupts the code at
``timeout_s`` by itself (``timed_out=True``, state kept); if no answer came by the host
deadline the code would not stop, and the backend must kill the sandbox. Errors::

    SandboxError (agent.errors)
     +-- RunnerLost              the runner can no longer be used: kill it, report state_lost
          +-- RunnerDeadline     no answer by the host-side deadline
          +-- RunnerExited       the channel hit EOF (the runner died or was killed)
          +-- RunnerProtocolError  the runner sent something that is not a valid frame

``SessionClient`` is not thread-safe: a backend serialises calls (one execution at a time)
and, to abort one from another thread, kills the runner so the pending ``recv`` sees EOF.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import struct
import subprocess
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.errors import SandboxError
from agent.sandbox import ExecResult
from agent.text import replace_unencodable

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_GRACE_S = 1.5  # past a cell's timeout_s, how long the host waits before it kills the runner
_RECV_CHUNK = 1 << 20


class RunnerLost(SandboxError):
    """The runner can no longer be used; the sandbox must be killed and restarted."""


class RunnerDeadline(RunnerLost):
    """The runner did not answer by the host-side deadline (the code would not stop)."""


class RunnerExited(RunnerLost):
    """The channel reached EOF: the runner died (crash, out of memory) or was killed."""


class RunnerProtocolError(RunnerLost):
    """The runner sent bytes that are not a valid frame, or an answer of the wrong shape."""


class Channel(Protocol):
    """A byte pipe to one runner. Implementations: ``PipeChannel``, a Docker socket, fakes.

    ``recv`` returns at most ``max_bytes`` bytes as soon as any are available, ``b""`` on
    EOF, and raises ``TimeoutError`` when nothing arrived within ``timeout_s`` (``None``
    waits for ever). ``send`` writes everything or raises ``OSError``. ``close`` is
    idempotent.
    """

    def send(self, data: bytes) -> None: ...

    def recv(self, max_bytes: int, timeout_s: float | None) -> bytes: ...

    def close(self) -> None: ...


def encode_frame(message: dict[str, Any]) -> bytes:
    """One frame: the 4-byte big-endian length, then the UTF-8 JSON body."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes as they arrive, get back whole messages.

    Raises ``RunnerProtocolError`` for an oversized frame, invalid JSON, or a body that is
    not a JSON object; text that is not UTF-8 comes through as U+FFFD.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                raise RunnerProtocolError(f"the runner sent a frame of {length} bytes")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            # The runner passes a lone surrogate of the code's text through as is, which is
            # no UTF-8: it arrives as U+FFFD, as does one sent escaped, so that no text a
            # sandbox produced can fail to encode later (in an event, in a response).
            text = body.decode("utf-8", "replace")
            try:
                message = json.loads(text)
            except ValueError as e:
                raise RunnerProtocolError(f"the runner sent an invalid frame: {e}") from e
            if "\\ud" in text or "\\uD" in text:
                message = replace_unencodable(message)
            if not isinstance(message, dict):
                raise RunnerProtocolError("the runner sent a frame that is not a JSON object")
            messages.append(message)
        return messages


class SessionClient:
    """Speaks the runner protocol over a ``Channel``. Does no I/O until called."""

    def __init__(
        self,
        channel: Channel,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.channel = channel
        self.grace_s = grace_s
        self._clock = clock
        self._decoder = FrameDecoder()
        self._inbox: list[dict[str, Any]] = []
        self._next_id = 0
        self.hello: dict[str, Any] | None = None

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the runner's ``{"ready": true, ...}`` frame and return it."""
        message = self._receive(self._clock() + timeout_s, "start")
        if message.get("ready") is not True:
            raise RunnerProtocolError(f"expected the ready frame, got {_preview(message)}")
        self.hello = message
        return message

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        """Run one cell. Raises ``RunnerLost`` (a subclass) if the runner must be killed."""
        response = self._call(
            {
                "op": "exec",
                "code": code,
                "timeout_s": timeout_s,
                "max_output_chars": max_output_chars,
            },
            timeout_s + self.grace_s,
        )
        if "stdout" not in response and response.get("error") is None:
            raise RunnerProtocolError(f"malformed exec answer: {_preview(response)}")
        return ExecResult.from_dict(response)

    def put_file(self, path: str, content: bytes, timeout_s: float = 30.0) -> None:
        """Write ``content`` to ``path`` (relative) in the work dir. ``ValueError`` if the
        runner refused (bad path, disk full)."""
        response = self._call(
            {"op": "put_file", "path": path, "content_b64": base64.b64encode(content).decode()},
            timeout_s,
        )
        if response.get("ok") is not True:
            raise ValueError(f"put_file {path!r}: {response.get('error')}")

    def ping(self, timeout_s: float = 5.0) -> float:
        """Round trip of a no-op; returns the seconds it took."""
        started = self._clock()
        self._call({"op": "ping"}, timeout_s)
        return self._clock() - started

    def close(self) -> None:
        self.channel.close()

    # -- internals ----------------------------------------------------------------------

    def _call(self, request: dict[str, Any], wait_s: float) -> dict[str, Any]:
        self._next_id += 1
        rid = self._next_id
        deadline = self._clock() + wait_s
        try:
            self.channel.send(encode_frame({**request, "id": rid}))
        except OSError as e:
            raise RunnerExited(f"could not send to the runner: {e}") from e
        while True:
            message = self._receive(deadline, request["op"])
            if message.get("id") == rid:
                return message
            # an answer to an earlier request we gave up on: ignore it

    def _receive(self, deadline: float, what: str) -> dict[str, Any]:
        while not self._inbox:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise RunnerDeadline(f"the runner did not answer {what} in time")
            try:
                data = self.channel.recv(_RECV_CHUNK, remaining)
            except TimeoutError as e:
                raise RunnerDeadline(f"the runner did not answer {what} in time") from e
            except OSError as e:
                raise RunnerExited(f"reading from the runner failed: {e}") from e
            if not data:
                raise RunnerExited(f"the runner exited during {what}")
            self._inbox.extend(self._decoder.feed(data))
        return self._inbox.pop(0)


class PipeChannel:
    """A ``Channel`` over two file descriptors, typically a subprocess's stdin/stdout.

    The channel owns both descriptors (``close`` closes them) and reads with a
    non-blocking ``os.read`` plus ``poll``: no threads, no Python buffering. Close it only
    once no call is in flight (kill the process first to unblock a pending ``recv``).
    """

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self._write_fd = write_fd
        self._read_fd = read_fd
        os.set_blocking(read_fd, False)
        self._poller = select.poll()
        self._poller.register(read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._closed = False

    @classmethod
    def for_process(cls, proc: subprocess.Popen[bytes]) -> PipeChannel:
        """A channel on duplicates of ``proc``'s stdin/stdout pipes (started with
        ``stdin=PIPE, stdout=PIPE``); the ``Popen`` keeps and closes its own copies."""
        if proc.stdin is None or proc.stdout is None:
            raise ValueError("the process needs stdin=PIPE and stdout=PIPE")
        return cls(os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno()))

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._write_fd, view)
            view = view[written:]

    def recv(self, max_bytes: int, timeout_s: float | None) -> bytes:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return os.read(self._read_fd, max_bytes)
            except BlockingIOError:
                pass
            if deadline is None:
                timeout_ms = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"nothing from the runner in {timeout_s} s")
                timeout_ms = int(remaining * 1000) + 1
            self._poller.poll(timeout_ms)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._write_fd, self._read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _preview(message: dict[str, Any]) -> str:
    return json.dumps(message)[:200]
