"""The delivery loop each worker runs: claim due webhooks from the outbox, send, settle.

``WebhookDeliverer`` polls the shards' ``{p}:{s}:webhooks:due`` every ``poll_s`` (or at
once when woken by a finishing task), claims up to as many due deliveries as it has free senders, and sends
each on a small thread pool. Every attempt is signed with the tenant's current secrets,
vetted against the destination policy again (resolve once, connect to what was checked),
recorded in the outbox, and counted in ``actfleet_webhook_deliveries_total{outcome}``.
What is due, and every retry's time, lives in Redis: a worker that stops (or dies) leaves
nothing behind but a lease that expires.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from agent.destinations import Allowlist, DestinationError, check_url
from store.records import TaskRecord
from store.webhook_secrets import signing_secrets
from store.webhooks import BATCH_EVENT, DeliveryLease, WebhookOutbox
from workers import metrics, webhook_http, webhooks
from workers.webhooks import Outcome

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """What the settings say about deliveries (``ACTFLEET_WEBHOOK_*``)."""

    allowlist: Allowlist
    retry_window_s: float = 86_400.0
    backoff_base_s: float = 5.0
    backoff_max_s: float = 3600.0
    timeouts: webhook_http.Timeouts = webhook_http.Timeouts()  # noqa: RUF009 - frozen
    concurrency: int = 8
    poll_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any) -> DeliveryPolicy:
        return cls(
            allowlist=settings.allowlist,
            retry_window_s=settings.webhook_retry_window_s,
            backoff_base_s=settings.webhook_backoff_base_s,
            backoff_max_s=settings.webhook_backoff_max_s,
            timeouts=webhook_http.Timeouts(
                settings.webhook_connect_timeout_s, settings.webhook_read_timeout_s
            ),
            concurrency=settings.webhook_concurrency,
            poll_s=settings.webhook_poll_s,
        )


class WebhookDeliverer:
    def __init__(
        self,
        outbox: WebhookOutbox,
        load_task: Callable[[str], TaskRecord | None],
        policy: DeliveryPolicy,
        worker_id: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox
        self.load_task = load_task
        self.policy = policy
        self.worker_id = worker_id
        self.ssl_context = ssl_context
        self.rand = rand
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        self.ssl_context = self.ssl_context or ssl.create_default_context()
        self._pool = ThreadPoolExecutor(self.policy.concurrency, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due deliveries now (a task with a webhook just finished)."""
        self._wake.set()

    def close(self, wait_s: float = 15.0) -> None:
        """Stop claiming; let attempts under way finish for up to ``wait_s`` (one that does
        not is claimed again by another worker when its lease runs out)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pool is not None:
            deadline = time.monotonic() + wait_s
            while self._inflight and time.monotonic() < deadline:
                time.sleep(0.05)
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                log.warning("webhooks.redis_unavailable", error=repr(e))
            except Exception:
                log.exception("webhooks.loop_failed")
            self._wake.wait(self.policy.poll_s)
            self._wake.clear()

    def run_once(self) -> int:
        """Claim what is due, up to the free senders, and start sending it; returns how
        many attempts were started."""
        assert self._pool is not None, "start() first"
        free = self.policy.concurrency - self._inflight
        started = 0
        if free <= 0:
            return 0
        for subject_id in self.outbox.due(free):
            lease = self.outbox.claim(subject_id, self.worker_id, self.policy.retry_window_s)
            if lease is None:
                continue  # another worker took it, or there is nothing left to send
            with self._lock:
                self._inflight += 1
            self._pool.submit(self._deliver_counted, lease)
            started += 1
        return started

    def _deliver_counted(self, lease: DeliveryLease) -> None:
        try:
            self.deliver(lease)
        except Exception:
            log.exception("webhook.failed_internally", webhook_id=lease.msg_id)
        finally:
            with self._lock:
                self._inflight -= 1

    # -- one attempt ---------------------------------------------------------------------

    def deliver(self, lease: DeliveryLease) -> Outcome:
        """Make the claimed attempt and settle it; returns its outcome."""
        # Sender threads are reused: drop whatever the previous delivery (or the code
        # that ran on this thread before) bound, then bind this one's context.
        structlog.contextvars.clear_contextvars()
        subject = "batch_id" if lease.event == BATCH_EVENT else "task_id"
        structlog.contextvars.bind_contextvars(
            webhook_id=lease.msg_id, attempt=lease.attempt, **{subject: lease.subject_id}
        )
        try:
            return self._deliver(lease)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the lease runs out and another attempt is claimed
        except Exception as e:
            # Our own fault (an unreadable record, a bug): settle it rather than leave it
            # to be claimed again, and crash again, every lease.
            log.exception("webhook.internal_error")
            record = {"attempt": lease.attempt, "at": time.time()}
            return self._final(lease, record, Outcome.FAILED, "", error=f"internal error: {e!r}")
        finally:
            structlog.contextvars.clear_contextvars()

    def _deliver(self, lease: DeliveryLease) -> Outcome:
        now = time.time()
        record: dict[str, Any] = {"attempt": lease.attempt, "at": now}
        try:
            endpoint = check_url(lease.url, self.policy.allowlist).url
        except DestinationError as e:
            return self._final(lease, record, Outcome.REFUSED, "", error=e.reason, rule=e.rule)
        since = self.outbox.disabled_since(lease.tenant, endpoint)
        if since is not None:
            return self._final(
                lease,
                record,
                Outcome.DISABLED,
                endpoint,
                error=f"the endpoint answered 410 Gone at {since:.0f} and is disabled",
            )
        payload = self._payload(lease, now)
        if payload is None:
            return self._final(
                lease, record, Outcome.FAILED, endpoint, error="the task or batch no longer exists"
            )
        secrets = signing_secrets(self.outbox.r, self.outbox.keys, lease.tenant, now)
        if not secrets:
            return self._final(
                lease,
                record,
                Outcome.FAILED,
                endpoint,
                error="the tenant has no webhook secret (actfleet keys rotate-webhook-secret)",
            )
        body = webhooks.body_of(payload)
        signed = webhooks.headers(secrets, lease.msg_id, int(now), body)
        try:
            sent = webhook_http.post(
                lease.url,
                body.encode(),
                signed,
                allowlist=self.policy.allowlist,
                timeouts=self.policy.timeouts,
                ssl_context=self.ssl_context,
            )
        except DestinationError as e:
            return self._final(
                lease, record, Outcome.REFUSED, endpoint, error=e.reason, rule=e.rule
            )
        except webhook_http.SendError as e:
            record.update(error=str(e), address=e.address, latency_ms=_ms(e.latency_s))
            return self._retry_or_give_up(lease, record, endpoint)
        record.update(
            status_code=sent.status_code, address=sent.address, latency_ms=_ms(sent.latency_s)
        )
        if sent.retry_after_s is not None:
            record["retry_after_s"] = sent.retry_after_s
        outcome = webhooks.outcome_of(sent.status_code)
        if outcome is Outcome.RETRY:
            return self._retry_or_give_up(lease, record, endpoint, sent.retry_after_s)
        if outcome is Outcome.FAILED and 300 <= sent.status_code < 400:
            record["error"] = "redirects are not followed: point the webhook at the final URL"
        return self._final(lease, record, outcome, endpoint)

    def _payload(self, lease: DeliveryLease, now: float) -> dict[str, Any] | None:
        if lease.event == BATCH_EVENT:
            batch, counts = self.outbox.batch(lease.subject_id)
            return webhooks.batch_payload(batch, counts, now) if batch else None
        task = self.load_task(lease.subject_id)
        return webhooks.task_payload(task, now) if task is not None else None

    def _retry_or_give_up(
        self,
        lease: DeliveryLease,
        record: dict[str, Any],
        endpoint: str,
        retry_after_s: float | None = None,
    ) -> Outcome:
        now = time.time()
        at = webhooks.retry_at(
            lease.attempt,
            now,
            lease.deadline,
            base_s=self.policy.backoff_base_s,
            max_s=self.policy.backoff_max_s,
            rand=self.rand,
            retry_after_s=retry_after_s,
        )
        if at is None:
            return self._final(lease, record, Outcome.GIVEN_UP, endpoint)
        record.update(outcome=Outcome.RETRY.value, next_attempt_at=at)
        if not self.outbox.settle(lease, record, "pending", next_at=at):
            return self._fenced()
        metrics.WEBHOOKS.labels(Outcome.RETRY.value).inc()
        log.warning(
            "webhook.retrying",
            http_status=record.get("status_code"),
            error=record.get("error"),
            retry_in_s=round(at - now, 3),
        )
        return Outcome.RETRY

    def _final(
        self,
        lease: DeliveryLease,
        record: dict[str, Any],
        outcome: Outcome,
        endpoint: str,
        **extra: Any,
    ) -> Outcome:
        record.update(outcome=outcome.value, **extra)
        state = outcome.value
        if not self.outbox.settle(lease, record, state, endpoint=endpoint):
            return self._fenced()
        metrics.WEBHOOKS.labels(outcome.value).inc()
        level = log.info if outcome is Outcome.DELIVERED else log.warning
        level(
            f"webhook.{outcome.value}",
            http_status=record.get("status_code"),
            error=record.get("error"),
            latency_ms=record.get("latency_ms"),
        )
        return outcome

    def _fenced(self) -> Outcome:
        # This attempt took longer than its lease and was claimed again: the newer
        # attempt's outcome counts. (The receiver may see both: webhook-id is the same.)
        log.warning("webhook.fenced_out")
        metrics.WEBHOOKS.labels("fenced").inc()
        return Outcome.RETRY


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
