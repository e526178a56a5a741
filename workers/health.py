"""A worker's health: is its broker consumer alive, and the HTTP server that says so.

A worker can look alive (its heartbeat renews leases, its threads run) while its broker
consumer takes nothing: the consumer's connection died and was never re-established, or
its prefetch window filled with deliveries it will never settle. Nothing inside Celery
reports that, so ``ConsumerWatch`` judges it from the outside, from what the heartbeat
sees each tick: messages are waiting, this worker has free slots, Redis answers, and yet
no message has reached the consumer for ``stall_s``. A healthy consumer with a free slot
takes a waiting message within milliseconds, so that cannot last; a consumer that is
reconnecting after an outage is back well within a minute (kombu retries at most every
30 s).

``HealthServer`` serves, on the worker's metrics port:

* ``/healthz`` (liveness): 503 once the consumer is judged dead, so Kubernetes (or a
  compose healthcheck) restarts the worker; 200 otherwise, also while Redis is down
  (restarting workers does not bring Redis back);
* ``/readyz``: 503 while the consumer is dead, Redis is unreachable or the worker drains;
* ``/metrics``: the Prometheus metrics.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

OK = "ok"
STALLED = "stalled"


class ConsumerWatch:
    """Judges the broker consumer from the heartbeat's observations. Thread-safe.

    ``observe`` is called each heartbeat tick in which Redis answered; ``received`` each
    time the consumer hands over a message, the only thing that brings a consumer judged
    dead back to life. A gap between observations longer than
    ``max_gap_s`` (Redis was down, the heartbeat stalled) starts the judgement afresh, so
    an outage never counts as time the consumer had to take a message.
    """

    def __init__(
        self,
        stall_s: float,
        *,
        max_gap_s: float = 15.0,
        on_stall: Callable[[float], None] = lambda waited_s: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_s = stall_s
        self.max_gap_s = max_gap_s
        self.on_stall = on_stall
        self.clock = clock
        self._lock = threading.Lock()
        self._waiting_since: float | None = None  # messages waiting and free slots, since
        self._last_seen: float | None = None
        self._stalled = False
        self._suspended = False

    @property
    def state(self) -> str:
        return STALLED if self._stalled else OK

    def received(self) -> None:
        with self._lock:
            self._waiting_since = None
            self._stalled = False

    def suspend(self) -> None:
        """Judge no more: the worker is stopping, its consumer stopped on purpose."""
        with self._lock:
            self._suspended = True
            self._waiting_since = None

    def observe(self, *, queued: int, held: int, slots: int) -> None:
        """``queued`` messages wait in the broker; this worker holds ``held`` of ``slots``."""
        now = self.clock()
        fire = None
        with self._lock:
            gap = self._last_seen is None or now - self._last_seen > self.max_gap_s
            self._last_seen = now
            if self._suspended:
                return
            if queued <= 0 or held >= slots:
                self._waiting_since = None  # nothing to judge by (a dead one stays dead)
            elif gap or self._waiting_since is None:
                self._waiting_since = now
            elif not self._stalled and now - self._waiting_since >= self.stall_s:
                self._stalled = True
                fire = now - self._waiting_since
        if fire is not None:
            self.on_stall(fire)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds are not worth a log line


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``port``, from a daemon thread.

    ``health()`` returns the worker's facts: ``consumer`` (``ok``/``stalled``), ``redis``
    (``ok``/``unavailable``), ``draining`` (bool), and anything else worth showing.
    """

    def __init__(
        self,
        port: int,
        health: Callable[[], dict[str, Any]],
        registry: CollectorRegistry,
        host: str = "0.0.0.0",
    ) -> None:
        self.health = health
        self._metrics = make_wsgi_app(registry)
        self._httpd = make_server(
            host, port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="health-http", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            facts = self.health()
            dead = facts.get("consumer") == STALLED
            if path == "/readyz":
                dead = dead or facts.get("redis") != OK or bool(facts.get("draining"))
            body = json.dumps({"status": "unavailable" if dead else "ok", **facts}).encode()
            status = "503 Service Unavailable" if dead else "200 OK"
            start_response(
                status,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return self._metrics(environ, start_response)
