"""Real webhook receivers on loopback for the tests: an HTTP server that records every POST
(and answers from a script), and a bare TCP listener that only counts connections (to show
that a refused destination was never contacted)."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    sni: str | None = None

    def verify(self, secret: str) -> dict[str, Any]:
        """The payload, after the independent Standard Webhooks implementation verified it
        (it raises ``WebhookVerificationError`` otherwise)."""
        return Webhook(secret).verify(self.body.decode(), self.headers)  # type: ignore[no-any-return]

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def signatures(self) -> list[str]:
        return self.headers["webhook-signature"].split(" ")


@dataclass
class Receiver:
    """``answers``: status codes to give in turn (then ``default``); an answer may also be
    a callable returning (status, extra headers). ``ssl_context``: serve HTTPS."""

    answers: list[Any] = field(default_factory=list)
    default: int = 204
    ssl_context: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        owner = self
        self._lock = threading.Lock()
        self._sni: dict[int, str | None] = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                sni = getattr(self.connection, "sni_name", None)
                with owner._lock:
                    owner.received.append(
                        Received(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.time(),
                            sni,
                        )
                    )
                    answer = owner.answers.pop(0) if owner.answers else owner.default
                status, extra = answer() if callable(answer) else (answer, {})
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                conn, addr = super().get_request()
                with owner._lock:
                    owner.connections += 1
                if owner.ssl_context is not None:
                    names: list[str | None] = [None]

                    def on_sni(sock: Any, name: str | None, ctx: Any) -> None:
                        names[0] = name

                    owner.ssl_context.sni_callback = on_sni
                    conn = owner.ssl_context.wrap_socket(conn, server_side=True)
                    conn.sni_name = names[0]  # type: ignore[attr-defined]
                return conn, addr

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def wait_for(self, n: int, timeout_s: float, what: Callable[[], int] | None = None) -> None:
        count = what or (lambda: len(self.received))
        deadline = time.monotonic() + timeout_s
        while count() < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {count()} requests, expected {n}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Listener:
    """A TCP listener on loopback that accepts and counts connections; it never answers
    (so it also stands in for a receiver that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self._held:
            c.close()
