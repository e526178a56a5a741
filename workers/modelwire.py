"""POSTs to one URL over kept-alive ``http.client`` connections: the model client's wire.

Why not the openai SDK's own HTTP stack on the hot path: for each call the SDK builds its
request (an options model, the URL parsed three times, headers merged) and sends it through
httpx and httpcore, several times the CPU of ``http.client`` per call, spent under the GIL
that a worker's agent loops share (docs/performance.md has the figures). The SDK still
decides what is sent (``workers.llm`` takes the URL and every header from it); this only
carries the bytes.

Thread-safe: each call takes an idle connection (or opens one) and puts it back after a
complete exchange. A connection the server has closed meanwhile is noticed before use
(it polls readable) and dropped; one that fails in use is closed, never reused.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple

MAX_IDLE = 256  # kept-alive connections per wire; more are closed after use


class WireTimeout(Exception):
    """No answer within the timeout (connecting, sending or waiting for the reply)."""


class WireFailed(Exception):
    """The connection could not be made or broke before a whole answer arrived."""


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Wire:
    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = dict(headers)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def post(self, body: bytes, timeout_s: float) -> Answer:
        conn = self._checkout(timeout_s)
        try:
            conn.request("POST", self._target, body=body, headers=self._headers)
            response = conn.getresponse()
            data = response.read()
        except TimeoutError as e:
            conn.close()
            raise WireTimeout(f"no reply within {timeout_s:.3g}s") from e
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise WireFailed(f"connection failed: {detail}") from e
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return Answer(response.status, headers, data)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkout(self, timeout_s: float) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(timeout_s)
            if conn.sock is not None and not _readable(conn.sock):
                conn.sock.settimeout(timeout_s)
                return conn
            conn.close()  # closed by the server while idle (or sent something unasked)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        if self._tls is None:
            self._tls = _tls_context()
        return http.client.HTTPSConnection(
            self._host, self._port, timeout=timeout_s, context=self._tls
        )


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _tls_context() -> ssl.SSLContext:
    """The system's trust store (it honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``), plus
    certifi's bundle where installed, as the SDK's own client trusts."""
    context = ssl.create_default_context()
    try:
        import certifi
    except ImportError:
        return context
    context.load_verify_locations(certifi.where())
    return context
