"""The model client's wire against a real socket server: connections are kept alive and
reused, and one the server closed while idle is replaced, never written to."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from workers.modelwire import Wire, WireFailed, WireTimeout


class Server:
    """Answers each POST with 200 "ok"; counts connections; optionally hangs up after
    each answer without saying so (no ``Connection: close``), as idle-timeouts do."""

    def __init__(self, hang_up: bool = False, delay_s: float = 0.0) -> None:
        self.hang_up = hang_up
        self.delay_s = delay_s
        self.connections = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/chat/completions"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                time.sleep(self.delay_s)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen: yes\r\n\r\nok")
                if self.hang_up:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def test_sends_the_given_headers_and_body_and_reuses_the_connection(server: Server) -> None:
    wire = Wire(server.url, {"Authorization": "Bearer k", "Content-Type": "application/json"})

    answers = [wire.post(b'{"n": %d}' % i, 5.0) for i in range(3)]

    assert [(a.status, a.body, a.headers["x-seen"]) for a in answers] == [(200, b"ok", "yes")] * 3
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k" in first and first.endswith(b'{"n": 0}')
    wire.close()


def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    server = Server(hang_up=True)
    wire = Wire(server.url, {})
    try:
        assert wire.post(b"{}", 5.0).status == 200
        time.sleep(0.1)  # the server's FIN arrives while the connection is idle
        assert wire.post(b"{}", 5.0).status == 200
        assert server.connections == 2
    finally:
        server.close()


def test_no_answer_within_the_timeout_and_no_server_are_told_apart() -> None:
    slow = Server(delay_s=1.0)
    try:
        with pytest.raises(WireTimeout, match=r"no reply within 0\.2s"):
            Wire(slow.url, {}).post(b"{}", 0.2)
    finally:
        slow.close()
    gone = socket.create_server(("127.0.0.1", 0))
    port = gone.getsockname()[1]
    gone.close()
    with pytest.raises(WireFailed, match="connection failed: ConnectionRefusedError"):
        Wire(f"http://127.0.0.1:{port}/v1", {}).post(b"{}", 1.0)


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Wire("ftp://example.org/v1", {})
