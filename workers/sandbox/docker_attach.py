"""A runner ``Channel`` over a Docker container's attach socket."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from typing import Any

_MUX_HEADER = struct.Struct(">BxxxL")  # Docker's attach multiplexing: stream, 0,0,0, size
_STDOUT, _STDERR = 1, 2
_STDERR_TAIL_BYTES = 8192


class AttachChannel:
    """A ``protocol.Channel`` over a container's attach socket (stdin in, stdout out).

    With ``tty=False`` Docker multiplexes stdout and stderr on the socket behind 8-byte
    headers; ``recv`` returns stdout bytes only and keeps a bounded tail of the runner's
    stderr (``stderr_tail``) for diagnostics. Non-blocking socket + ``poll``: no threads.
    ``close`` may be called from another thread only once the container is gone.
    """

    def __init__(self, sock_io: Any) -> None:
        self._io = sock_io  # keeps the HTTP response (and so the connection) alive
        self._sock: socket.socket = getattr(sock_io, "_sock", sock_io)
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._in_poll = select.poll()
        self._in_poll.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self._out_poll = select.poll()
        self._out_poll.register(self._fd, select.POLLOUT | select.POLLHUP | select.POLLERR)
        self._raw = bytearray()  # multiplexed bytes not yet parsed
        self._stdout = bytearray()
        self.stderr_tail = bytearray()
        self._eof = False
        self._closed = False

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise OSError("the channel is closed")
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                self._out_poll.poll(1000)
                continue
            view = view[sent:]

    def recv(self, max_bytes: int, timeout_s: float | None) -> bytes:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._stdout:
                out = bytes(self._stdout[:max_bytes])
                del self._stdout[:max_bytes]
                return out
            if self._eof or self._closed:
                return b""
            try:
                chunk = self._sock.recv(1 << 20)
            except BlockingIOError:
                if deadline is None:
                    self._in_poll.poll(None)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"nothing from the sandbox in {timeout_s} s") from None
                self._in_poll.poll(int(remaining * 1000) + 1)
                continue
            except OSError:
                if self._closed:
                    return b""
                raise
            if not chunk:
                self._eof = True
                continue
            self._demux(chunk)

    def idle_ok(self) -> bool:
        """True if nothing is waiting on the socket: an idle runner is silent, so input
        (or EOF) here means it died or misbehaved while it sat in the pool."""
        if self._closed or self._eof or self._stdout:
            return False
        return not self._in_poll.poll(0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(Exception):  # best effort: the HTTP wrapper may be half gone
            self._io.close()

    def _demux(self, chunk: bytes) -> None:
        self._raw += chunk
        while len(self._raw) >= _MUX_HEADER.size:
            stream, size = _MUX_HEADER.unpack_from(self._raw)
            end = _MUX_HEADER.size + size
            if len(self._raw) < end:
                return
            payload = self._raw[_MUX_HEADER.size : end]
            del self._raw[:end]
            if stream == _STDOUT:
                self._stdout += payload
            elif stream == _STDERR:
                self.stderr_tail += payload
                del self.stderr_tail[:-_STDERR_TAIL_BYTES]
