"""A worker process: the Celery app with its tasks, and the runtime they share.

``WorkerRuntime`` owns what lives as long as the process: the Redis client, the model
client (and its gate, with ``ACTFLEET_MODEL_MAX_INFLIGHT``), the sandbox provider, the
heartbeat, sweeper and webhook delivery threads, the health and metrics server. Its
constructor does no I/O; ``start()`` (on Celery's ``worker_ready``) does.

Health: a ``ConsumerWatch`` fed by the heartbeat tells a dead broker consumer (messages
waiting, free slots, nothing received for ``worker_consumer_stall_s``); the status key
and ``/healthz`` say so, and with ``worker_exit_on_stall`` the worker then stops and
exits with ``EXIT_CONSUMER_STALLED`` so that its supervisor starts a fresh one.

Stopping (SIGTERM, or a dead consumer): Celery's warm shutdown stops the consumer, so
the worker takes no new task, and ``workers.shutdown.Drain`` gives the running ones
``worker_shutdown_grace_s`` to finish before it hands them back, so the process exits
soon after, with status 0 (or ``EXIT_CONSUMER_STALLED``).

Run it with ``actfleet worker`` (or ``run_worker(settings)``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
import structlog
from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown, worker_shutting_down
from celery.worker import state as celery_state

from config.heap import freeze_startup_heap
from config.settings import Settings
from store import keys
from store.celery_app import DEFAULT_REDIS_URL, enqueue, make_celery
from store.clients import sync_client
from store.keys import GATE_LEASE_TTL_S, Keys, Retention
from store.webhooks import WebhookOutbox
from store.worker_store import WorkerStore
from workers import metrics
from workers.attempts import Attempts
from workers.celery_tasks import register_tasks
from workers.gateplan import GateConfig
from workers.gatestore import RedisGateStore, server_id, server_label
from workers.health import ConsumerWatch, HealthServer
from workers.leases import Heartbeat
from workers.lull import LullExecutor
from workers.modelgate import ModelGate
from workers.sandbox import make_provider
from workers.shutdown import Drain
from workers.sweeper import Sweeper
from workers.webhook_delivery import DeliveryPolicy, WebhookDeliverer

log = structlog.get_logger(__name__)


def redis_client(url: str) -> redis.Redis:
    """The worker's client for ``url``: one Redis, or a cluster (``store.clients``)."""
    return sync_client(
        url,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry_on_timeout=True,
    )


GIL_SWITCH_INTERVAL_S = 0.0005
EXIT_CONSUMER_STALLED = 3  # the process's exit status when it stopped for a dead consumer


class WorkerRuntime:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = WorkerStore(
            redis_client(settings.redis_url or DEFAULT_REDIS_URL),
            Keys(settings.key_prefix),
            patience_s=settings.redis_patience_s,
            broker=redis_client(settings.broker_url) if settings.broker_url else None,
            retention=Retention(settings.record_retention_s, settings.stream_retention_s),
        )
        self.consumer = ConsumerWatch(settings.worker_consumer_stall_s, on_stall=self._stalled)
        self.heartbeat = Heartbeat(
            self.store,
            self.worker_id,
            consumer=self.consumer,
            held=lambda: len(celery_state.reserved_requests),
            slots=settings.worker_concurrency,
        )
        self.exit_code = 0
        self._health: HealthServer | None = None
        self._drain = Drain(
            self.store,
            self.heartbeat,
            lambda task_id, enqueued_ms: enqueue(app, task_id, enqueued_ms),
            settings.worker_shutdown_grace_s,
        )
        self.webhooks = WebhookDeliverer(
            WebhookOutbox(self.store.r, self.store.keys, retention=self.store.retention),
            self.store.get,
            DeliveryPolicy.from_settings(settings),
            self.worker_id,
        )
        self.sweeper = Sweeper(
            self.store,
            self.worker_id,
            max_attempts=settings.max_attempts,
            enqueue=lambda task_id, enqueued_ms: enqueue(app, task_id, enqueued_ms),
            on_finished=lambda task_id: self.webhooks.wake(),
            interval_s=settings.sweep_interval_s,
            queued_grace_s=settings.queued_grace_s,
        )
        self._attempts: Attempts | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closer: LullExecutor | None = None
        self._gate: ModelGate | None = None

    @property
    def attempts(self) -> Attempts:
        with self._lock:
            if self._attempts is None:
                self._attempts = self._build_attempts()
            return self._attempts

    def _build_attempts(self) -> Attempts:
        from workers.llm import OpenAILLM

        def on_response(model: str, seconds: float, prompt: int, completion: int) -> None:
            metrics.LLM_REQUEST.labels(model).observe(seconds)
            metrics.LLM_TOKENS.labels("prompt").inc(prompt)
            metrics.LLM_TOKENS.labels("completion").inc(completion)

        llm = OpenAILLM(
            timeout_s=self.settings.llm_timeout_s,
            max_retries=self.settings.llm_max_retries,
            on_response=on_response,
        )
        if self.settings.model_max_inflight is not None:
            llm.gate = self._gate = self._build_gate(llm.base_url, self.settings.model_max_inflight)
        provider = make_provider(self.settings, self.worker_id)
        self._pool = ThreadPoolExecutor(
            self.settings.worker_concurrency, thread_name_prefix="sandbox-start"
        )
        # Finished tasks' sandboxes close in the lull after a wave of tasks ends, not in it.
        self._closer = LullExecutor(2, name="sandbox-close")
        return Attempts(
            self.settings,
            self.store,
            llm,
            provider,
            self.heartbeat,
            self._pool,
            worker_id=self.worker_id,
            on_finished=lambda task_id: self.webhooks.wake(),  # FINISH made it due
            sandbox_closer=self._closer,
        )

    def _build_gate(self, base_url: str, cap: int) -> ModelGate:
        store = RedisGateStore(self.store.r, self.store.keys, server_id(base_url))
        config = GateConfig(cap, ttl_ms=int(GATE_LEASE_TTL_S * 1000))
        return ModelGate(store, self.worker_id, config, server=server_label(base_url))

    def start(self) -> None:
        if self.settings.worker_metrics_port:
            self._health = HealthServer(
                self.settings.worker_metrics_port, self.health, metrics.registry()
            ).start()
        self.attempts  # noqa: B018  build the model client and sandbox provider up front
        self.heartbeat.start()  # first, so this worker counts as alive for every reaper
        if self._gate is not None:
            self._gate.start()
        # what dead workers' sandboxes left behind: now, and in the background where needed
        self.attempts.provider.start_housekeeping(self.store.worker_alive)
        self.attempts.provider.start_pool()
        self.heartbeat.status = self._status
        self.sweeper.start()
        self.webhooks.start()
        frozen = freeze_startup_heap()  # last: everything the process keeps exists now
        log.info(
            "worker.started",
            worker=self.worker_id,
            concurrency=self.settings.worker_concurrency,
            metrics_port=self.settings.worker_metrics_port,
            frozen_objects=frozen,
        )

    def health(self) -> dict[str, object]:
        """What ``/healthz`` and ``/readyz`` report (see ``workers.health``)."""
        return {
            "worker": self.worker_id,
            "consumer": self.consumer.state,
            "redis": "ok" if self.heartbeat.redis_ok() else "unavailable",
            "draining": self.draining,
            "leases": len(self.heartbeat.leases()),
        }

    @property
    def draining(self) -> bool:
        return self._drain.started

    def drain(self, exit_code: int = 0) -> None:
        """Start stopping (see ``workers.shutdown``); returns at once."""
        self.consumer.suspend()  # its consumer stops on purpose now
        self._drain.start(exit_code)

    def message_received(self) -> None:
        self.consumer.received()

    def _stalled(self, waited_s: float) -> None:
        """The consumer took nothing for ``waited_s`` while messages waited and slots were
        free: it is dead. Say so (status key, health), and stop so a supervisor restarts
        the worker."""
        log.error(
            "consumer.stalled",
            waited_s=round(waited_s, 1),
            exits=self.settings.worker_exit_on_stall,
        )
        if self.settings.worker_exit_on_stall:
            self.exit_code = EXIT_CONSUMER_STALLED
            self.drain(EXIT_CONSUMER_STALLED)
            # Celery's own warm shutdown, as a SIGTERM would start it: its consumer loop
            # checks this flag on every tick, and the process exits with this status.
            celery_state.should_stop = EXIT_CONSUMER_STALLED

    def _status(self) -> dict[str, object]:
        """What the worker's status key says besides its leases and its consumer."""
        return {"draining": self.draining, "pool_idle": self.attempts.provider.pool_stats().idle}

    def close(self) -> None:
        self._drain.closed()
        if self._health is not None:
            self._health.close()
        self.sweeper.close()
        self.webhooks.close()
        self.heartbeat.close()
        if self._gate is not None:
            self._gate.close()  # its permits go back to the fleet now, not at lease expiry
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._closer is not None:
            self._closer.shutdown(wait=True)  # every finished task's sandbox goes
        if self._attempts is not None:
            self._attempts.provider.close()  # its pool's idle sandboxes and its housekeeping
        log.info("worker.stopped", worker=self.worker_id)


def make_worker_app(settings: Settings) -> tuple[Celery, WorkerRuntime]:
    app = make_celery(
        settings.broker,
        concurrency=settings.worker_concurrency,
        time_limit_s=settings.task_time_limit_s,
    )
    runtime = WorkerRuntime(settings, app)
    register_tasks(
        app,
        lambda task_id, enqueued_ms, batch_id: runtime.attempts.run(task_id, enqueued_ms, batch_id),
    )

    def on_ready(sender: object = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            runtime.start()

    def on_shutdown(sender: object = None, **_: object) -> None:
        runtime.close()

    def on_received(sender: object = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            runtime.message_received()

    def on_shutting_down(**_: object) -> None:
        runtime.drain()  # SIGTERM/SIGINT: Celery stops consuming; we bound the wait

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    task_received.connect(on_received, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)
    return app, runtime


def run_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run a worker in this process until it is stopped (SIGTERM/SIGINT: warm shutdown);
    returns the exit status (0, or ``EXIT_CONSUMER_STALLED``)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model call is noise
    # Many agent loops share this process's GIL. Each returns from a socket wait needing the
    # GIL back, and the default 5 ms switch interval makes every such return (the consumer
    # taking a message, a model reply arriving) wait behind busy threads; 0.5 ms keeps
    # these hand-offs short at a small cost in switching.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    app, runtime = make_worker_app(settings)
    status = app.start(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_concurrency}",
            f"--queues={keys.TASK_QUEUE}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=actfleet-{os.getpid()}@{socket.gethostname()}",
        ]
    )
    return runtime.exit_code or int(status or 0)
