"""One typed settings object per process, read from ``ACTFLEET_*`` environment variables.

Build it once at start-up (``Settings()``) and pass it down; nothing reads the environment
at import time. The model server is configured by the ``openai`` SDK's own
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, which are deliberately not fields here.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.destinations import Allowlist
from agent.specschema import LIMITS, MAX_FILES_BYTES, SANDBOX, Number

DEFAULT_MAX_BATCH_TASKS = 10_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACTFLEET_", extra="ignore")

    # shared
    redis_url: str | None = Field(
        None,
        description="Redis for queue, records and streams; `actfleet up` starts one if unset; "
        "`redis+cluster://host:port` names a Redis Cluster (then set ACTFLEET_BROKER_URL)",
    )
    broker_url: str | None = Field(
        None,
        description="Redis for the task queue (the Celery broker), when it is not "
        "ACTFLEET_REDIS_URL's: records and streams then live on one Redis, messages on this one",
    )
    key_prefix: str = "af"
    model: str = Field("actfleet-fake", description="model used when a task names none")
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    record_retention_s: int = Field(
        30 * 24 * 3600,
        ge=60,
        description="how long a finished task's record (its result and trajectory) is kept; "
        "batch records are kept twice as long",
    )
    stream_retention_s: int = Field(
        7 * 24 * 3600, ge=60, description="how long a finished task's event stream is kept"
    )
    redis_memory_high_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="above this fraction of Redis' maxmemory the API refuses new tasks and "
        "batches (503 + Retry-After); the rest is room for the work already accepted",
    )
    redis_full_retry_after_s: int = Field(
        30, ge=1, description="the Retry-After of a 503 because Redis is (nearly) full"
    )

    # sandboxes
    sandbox: Literal["bwrap", "docker"] = "bwrap"
    sandbox_image: str = "actfleet-sandbox:latest"
    sandbox_allow_network: bool = Field(False, description="may a task ask for network access")
    sandbox_max_memory_mb: int = Field(
        4096, ge=64, description="the largest sandbox.memory_mb a task may ask for"
    )
    sandbox_max_cpus: float = Field(4.0, gt=0, description="the largest sandbox.cpus")
    sandbox_work_mb: int = Field(256, ge=1, description="size of a sandbox's /work (tmpfs)")
    sandbox_work_files: int = Field(
        10_000, ge=16, description="files and directories a sandbox's /work may hold"
    )
    bwrap_zygote: bool = Field(
        True,
        description="start bwrap sandboxes as forks of one resident runner per worker (a "
        "zygote: a few ms of CPU per start instead of ~20); where it cannot start (no "
        "writable cgroups, no user namespaces) and for tasks with network, the classic path",
    )
    fleet_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="labels this deployment's sandbox containers, so that a reaper removes "
        "only its own; default: derived from the Redis URL and the key prefix",
    )
    pool_min: int = 2
    pool_max: int = 8
    pool_idle_s: float = 300.0
    pool_max_age_s: float = 1800.0

    # workers
    worker_concurrency: int = Field(50, ge=1, le=1000, description="agent loops per process")
    max_attempts: int = Field(3, ge=1, le=20)
    llm_timeout_s: float = 120.0
    llm_max_retries: int = 4
    model_max_inflight: int | None = Field(
        None,
        ge=1,
        description=(
            "fleet-wide cap on in-flight requests to the model server (per base URL), shared "
            "by every worker through Redis; the limit adapts below it on 429/503/timeouts "
            "(unset: no cap, each worker sends what its loops ask)"
        ),
    )
    worker_metrics_port: int | None = Field(
        None, description="serve the worker's /metrics on this port (unset: no server)"
    )
    task_time_limit_s: float = Field(
        87_000.0, description="hard limit on one attempt (above the largest limits.timeout_s)"
    )
    retry_backoff_s: float = Field(2.0, description="first delay before retrying an infra fault")
    retry_backoff_max_s: float = 60.0
    # webhooks (see workers/webhooks.py): retried with backoff and jitter for a window
    webhook_retry_window_s: float = Field(
        86_400.0, gt=0, description="how long a webhook is retried before it is given up"
    )
    webhook_backoff_base_s: float = Field(5.0, gt=0, description="first retry delay (jittered)")
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="longest delay between tries")
    webhook_connect_timeout_s: float = Field(3.0, gt=0, le=20)
    webhook_read_timeout_s: float = Field(10.0, gt=0, le=20)
    webhook_concurrency: int = Field(8, ge=1, le=256, description="deliveries at once per worker")
    webhook_poll_s: float = Field(
        1.0, gt=0, le=60, description="how often workers look for due ones"
    )
    redis_patience_s: float = Field(
        120.0, gt=0, description="how long a worker's store calls wait for Redis to come back"
    )
    worker_shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, how long running tasks may finish before they are handed back",
    )
    worker_consumer_stall_s: float = Field(
        60.0,
        gt=0,
        description="messages waiting, free slots and nothing received for this long: the "
        "worker's broker consumer is dead (health 503, status key says so)",
    )
    worker_exit_on_stall: bool = Field(
        True, description="a worker whose consumer is dead hands its tasks back and exits 3"
    )
    sweep_interval_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="how often each worker looks for tasks whose lease expired or whose "
        "message was lost, and hands them back to the queue",
    )
    queued_grace_s: float = Field(
        60.0,
        gt=0,
        description="a queued task whose message is gone for this long is enqueued again",
    )

    # api
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_tasks: int = Field(
        DEFAULT_MAX_BATCH_TASKS,
        ge=1,
        description="tasks in one batch: at most max_active_per_tenant (and by default "
        "10,000 or max_active_per_tenant, whichever is lower)",
    )
    max_active_per_tenant: int = Field(10_000, ge=1, description="unfinished tasks per tenant")
    sse_heartbeat_s: float = Field(
        15.0, gt=0, description="idle SSE streams get a comment this often"
    )
    webhook_allowlist: str = Field(
        "",
        description="comma-separated host names or CIDRs webhooks may reach although they are "
        "not public (e.g. 127.0.0.1/32 for a local receiver); empty: public addresses only",
    )
    webhook_rotation_grace_s: float = Field(
        86_400.0, ge=0, description="after a secret rotation, how long both signatures are sent"
    )

    @field_validator("webhook_allowlist")
    @classmethod
    def _allowlist_parses(cls, v: str) -> str:
        Allowlist.parse(v)  # a ValueError names the bad entry
        return v

    @property
    def broker(self) -> str | None:
        """Where the task queue lives: ``broker_url``, else ``redis_url``."""
        return self.broker_url or self.redis_url

    @property
    def allowlist(self) -> Allowlist:
        """``webhook_allowlist``, parsed."""
        return Allowlist.parse(self.webhook_allowlist)

    @property
    def fleet(self) -> str:
        """This deployment's fleet id: ``fleet_id``, else a hash of what its processes
        share (the Redis URL and the key prefix), so two deployments on one Docker engine
        differ and every process of one agrees."""
        if self.fleet_id:
            return self.fleet_id
        shared = f"{self.redis_url or ''}|{self.key_prefix}".encode()
        return hashlib.sha256(shared).hexdigest()[:16]

    @model_validator(mode="before")
    @classmethod
    def _batch_default(cls, data: Any) -> Any:
        """Without its own setting, a batch may be as large as a tenant's budget allows."""
        if isinstance(data, dict) and data.get("max_batch_tasks") is None:
            with contextlib.suppress(TypeError, ValueError):  # the field check reports it
                active = int(data.get("max_active_per_tenant") or DEFAULT_MAX_BATCH_TASKS)
                data = {**data, "max_batch_tasks": min(DEFAULT_MAX_BATCH_TASKS, active)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Refuse settings that contradict each other, at start-up, saying which."""
        problems = []
        cluster = urlsplit(self.redis_url or "").scheme.endswith("+cluster")  # store.clients
        if cluster and not self.broker_url:
            problems.append(
                "ACTFLEET_REDIS_URL names a Redis Cluster, which cannot hold the task queue: "
                "set ACTFLEET_BROKER_URL to a plain Redis for it"
            )
        if self.max_batch_tasks > self.max_active_per_tenant:
            problems.append(
                f"ACTFLEET_MAX_BATCH_TASKS ({self.max_batch_tasks}) is above "
                f"ACTFLEET_MAX_ACTIVE_PER_TENANT ({self.max_active_per_tenant}): a batch that "
                "large could never be queued; lower the first or raise the second"
            )
        if self.pool_min > self.pool_max:
            problems.append(
                f"ACTFLEET_POOL_MIN ({self.pool_min}) is above ACTFLEET_POOL_MAX ({self.pool_max})"
            )
        if self.retry_backoff_s > self.retry_backoff_max_s:
            problems.append(
                f"ACTFLEET_RETRY_BACKOFF_S ({self.retry_backoff_s:g}) is above "
                f"ACTFLEET_RETRY_BACKOFF_MAX_S ({self.retry_backoff_max_s:g})"
            )
        memory = SANDBOX.field("memory_mb")
        if self.sandbox_max_memory_mb < memory.default:
            problems.append(
                f"ACTFLEET_SANDBOX_MAX_MEMORY_MB ({self.sandbox_max_memory_mb}) is below the "
                f"default sandbox.memory_mb ({memory.default}): every task that does not ask "
                "for less would be refused"
            )
        cpus = SANDBOX.field("cpus")
        if self.sandbox_max_cpus < cpus.default:
            problems.append(
                f"ACTFLEET_SANDBOX_MAX_CPUS ({self.sandbox_max_cpus:g}) is below the default "
                f"sandbox.cpus ({cpus.default:g}): every task that does not ask for less "
                "would be refused"
            )
        if self.sandbox_work_mb * 1024 * 1024 < MAX_FILES_BYTES:
            problems.append(
                f"ACTFLEET_SANDBOX_WORK_MB ({self.sandbox_work_mb}) is below the "
                f"{MAX_FILES_BYTES // (1024 * 1024)} MB of files a task may bring"
            )
        timeout = LIMITS.field("timeout_s").kind
        assert isinstance(timeout, Number)
        if self.task_time_limit_s <= timeout.hi:
            problems.append(
                f"ACTFLEET_TASK_TIME_LIMIT_S ({self.task_time_limit_s:g}) is not above the "
                f"largest limits.timeout_s ({timeout.hi:g}): attempts would be killed before "
                "their task's own time limit"
            )
        if problems:
            raise ValueError("contradictory settings: " + "; ".join(problems))
        return self
