"""A fleet-wide cap on one model server's in-flight requests, as one worker process sees it.

``ACTFLEET_MODEL_MAX_INFLIGHT`` caps the requests all workers together have in flight to
one model server (one base URL). Each worker process leases a block of permits from the
fleet (``workers.gatestore``, with the rules in ``workers.gateplan``) and hands them to its
agent loops locally (``workers.permits``), so a model call costs no Redis round trip: a
background thread syncs with the fleet once a second, or every ``fast_tick_s`` while this
process is owed permits or gives some back, and at once when a request starts waiting with
permits to be had or an overload was seen. Each sync renews the lease on the permits; a
killed worker's permits come back within ``GATE_LEASE_TTL_S``, and one that cannot reach
Redis for that long stops using its own.

The limit adapts (AIMD): an overload answer (``Outcome.THROTTLED``, ``UNAVAILABLE``,
``TIMEOUT``) lowers it fleet-wide, successes raise it back towards the cap. ``acquire``
waits for a permit until the request's own deadline and raises ``GateTimeout`` after it;
``observe`` takes each exchange's outcome, ``release`` gives the permit back. The model
client (``workers.llm``) decides what to retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

import redis
import structlog

from store.keys import GATE_FAST_TICK_S, GATE_TICK_S
from workers import metrics
from workers.gateplan import GateConfig, Grant, Report
from workers.gatestore import GateStore
from workers.permits import Permits

log = structlog.get_logger(__name__)

MIN_SYNC_GAP_S = 0.05  # however often something asks, syncs are at least this far apart


class Outcome(StrEnum):
    """How a request that held a permit ended; the values label ``actfleet_llm_overloads_total``."""

    OK = "ok"
    FAILED = "failed"  # a failure that says nothing about load (a refusal, a broken reply)
    THROTTLED = "429"
    UNAVAILABLE = "503"
    TIMEOUT = "timeout"


OVERLOADS = frozenset({Outcome.THROTTLED, Outcome.UNAVAILABLE, Outcome.TIMEOUT})


class GateTimeout(Exception):
    """The request's deadline came before a permit did."""


class ModelGate:
    """Thread-safe. ``start()`` begins syncing (it does I/O); ``close()`` gives every permit
    back. ``server`` is the metrics label (``gatestore.server_label``)."""

    def __init__(
        self,
        store: GateStore,
        holder: str,
        config: GateConfig,
        *,
        server: str,
        tick_s: float = GATE_TICK_S,
        fast_tick_s: float = GATE_FAST_TICK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.holder = holder
        self.config = config
        self.server = server
        self.tick_s = tick_s
        self.fast_tick_s = fast_tick_s
        self._clock = clock
        self.permits = Permits(on_starved=self._starved, clock=clock)
        self._lock = threading.Lock()
        self._successes = 0
        self._overload_epoch: int | None = None
        self._epoch = 0
        self.grant: Grant | None = None  # the fleet's last answer
        self._lease_until: float | None = None  # our permits are ours until then
        self._last_sync = float("-inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait_s = metrics.LLM_SLOT_WAIT.labels(server)
        self._overloads = {o: metrics.LLM_OVERLOADS.labels(server, o.value) for o in OVERLOADS}

    # -- the hot path ----------------------------------------------------------------

    def acquire(self, deadline: float | None) -> int:
        """Wait for a permit until ``deadline`` (``clock`` time; None: no limit). Returns the
        token to ``release`` it with (the epoch of the limit it was sent under)."""
        asked = self._clock()
        if not self.permits.acquire(deadline):
            self._wait_s.observe(self._clock() - asked)
            raise GateTimeout(f"no slot on {self.server} before the request's deadline")
        self._wait_s.observe(self._clock() - asked)
        return self._epoch

    def observe(self, token: int, outcome: Outcome) -> None:
        """How an exchange under the permit of ``token`` went (one permit may see several:
        a request retried while it keeps its slot)."""
        if outcome is Outcome.OK:
            with self._lock:
                self._successes += 1
        elif outcome in OVERLOADS:
            self._overloads[outcome].inc()
            with self._lock:
                if self._overload_epoch is None or token > self._overload_epoch:
                    self._overload_epoch = token
            self._wake.set()

    def release(self) -> None:
        self.permits.release()

    # -- syncing with the fleet ------------------------------------------------------

    def sync(self) -> Grant:
        """One exchange with the fleet: report, and take what it grants."""
        started = self._clock()
        usage = self.permits.usage()
        with self._lock:
            successes, self._successes = self._successes, 0
            overload, self._overload_epoch = self._overload_epoch, None
        report = Report(
            want=usage.in_use + usage.waiting,
            in_use=usage.in_use,
            successes=successes,
            overload_epoch=overload,
        )
        try:
            grant = self.store.sync(self.holder, report, self.config)
        except BaseException:
            with self._lock:  # not reported: keep it for the next sync
                self._successes += successes
                if overload is not None and (
                    self._overload_epoch is None or overload > self._overload_epoch
                ):
                    self._overload_epoch = overload
            raise
        if grant.epoch > self._epoch:
            log.info("gate.limit_lowered", server=self.server, limit=round(grant.limit, 2))
        self._epoch = grant.epoch
        self.grant = grant
        self._lease_until = started + self.config.ttl_ms / 1000.0
        self.permits.set_granted(grant.permits)
        self._publish()
        return grant

    def start(self) -> None:
        try:
            self.sync()  # permits before the first task asks, if Redis answers now
        except redis.RedisError as e:
            log.warning("gate.sync_failed", server=self.server, error=repr(e))
        self._thread = threading.Thread(target=self._run, name="model-gate", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.permits.set_granted(0)
        try:
            self.store.leave(self.holder)
        except redis.RedisError as e:  # the lease expires by itself
            log.warning("gate.leave_failed", server=self.server, error=repr(e))
        for gauge in (metrics.LLM_INFLIGHT, metrics.LLM_WAITING, metrics.LLM_PERMITS):
            gauge.labels(self.server).set(0)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval())
            if self._stop.is_set():
                return
            self._wake.clear()
            gap = self._last_sync + MIN_SYNC_GAP_S - self._clock()
            if gap > 0 and self._stop.wait(gap):
                return
            self._last_sync = self._clock()
            try:
                self.sync()
            except redis.RedisError as e:
                log.warning("gate.sync_failed", server=self.server, error=repr(e))
                self._check_lease()
            except Exception:
                log.exception("gate.sync_failed", server=self.server)
                self._check_lease()

    def _check_lease(self) -> None:
        """Past our lease the fleet may have handed our permits to others: stop using them."""
        if self._lease_until is not None and self._clock() >= self._lease_until:
            if self.permits.usage().granted:
                log.warning("gate.lease_lapsed", server=self.server)
            self.permits.set_granted(0)
            self._publish()

    def _interval(self) -> float:
        """Sync soon while permits are owed to us or by us; else once a tick."""
        grant, usage = self.grant, self.permits.usage()
        if grant is None or usage.in_use > usage.granted:
            return self.fast_tick_s
        if usage.waiting and grant.permits < grant.share:
            return self.fast_tick_s
        if usage.in_use + usage.waiting < usage.granted and grant.wanted > int(grant.limit):
            return self.fast_tick_s  # idle permits while others wait
        return self.tick_s

    def _starved(self) -> None:
        """A request started waiting: ask at once if the fleet may have permits for us."""
        grant = self.grant
        if grant is None or grant.permits < grant.share or grant.wanted < int(grant.limit):
            self._wake.set()

    def _publish(self) -> None:
        usage = self.permits.usage()
        metrics.LLM_INFLIGHT.labels(self.server).set(usage.in_use)
        metrics.LLM_WAITING.labels(self.server).set(usage.waiting)
        metrics.LLM_PERMITS.labels(self.server).set(usage.granted)
        if self.grant is not None:
            metrics.LLM_LIMIT.labels(self.server).set(self.grant.limit)
