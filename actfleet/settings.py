"""One typed settings object per process, read from ``ACTFLEET_*`` environment variables.

Build it once at start-up (``Settings()``) and pass it down; nothing reads the environment
at import time. The model server is configured by the ``openai`` SDK's own
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, which are deliberately not fields here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACTFLEET_", extra="ignore")

    # shared
    redis_url: str | None = Field(
        None, description="Redis for queue, records and streams; `actfleet up` starts one if unset"
    )
    key_prefix: str = "af"
    model: str = Field("actfleet-fake", description="model used when a task names none")
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    # sandboxes
    sandbox: Literal["bwrap", "docker"] = "bwrap"
    sandbox_image: str = "actfleet-sandbox:latest"
    sandbox_allow_network: bool = Field(False, description="may a task ask for network access")
    pool_min: int = 2
    pool_max: int = 8
    pool_idle_s: float = 300.0
    pool_max_age_s: float = 1800.0

    # workers
    worker_concurrency: int = Field(50, ge=1, le=1000, description="agent loops per process")
    max_attempts: int = Field(3, ge=1, le=20)
    llm_timeout_s: float = 120.0
    llm_max_retries: int = 4
    worker_metrics_port: int | None = Field(
        None, description="serve the worker's /metrics on this port (unset: no server)"
    )
    task_time_limit_s: float = Field(
        87_000.0, description="hard limit on one attempt (above the largest limits.timeout_s)"
    )
    retry_backoff_s: float = Field(2.0, description="first delay before retrying an infra fault")
    retry_backoff_max_s: float = 60.0
    webhook_max_attempts: int = 8
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
    queued_grace_s: float = Field(
        60.0,
        gt=0,
        description="a queued task whose message is gone for this long is enqueued again",
    )

    # api
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_tasks: int = 20_000
    max_active_per_tenant: int = 10_000
    sse_heartbeat_s: float = Field(
        15.0, gt=0, description="idle SSE streams get a comment this often"
    )
    webhook_secret: str | None = Field(
        None,
        description="Standard Webhooks signing secret (whsec_...); webhooks are unsigned without it",
    )
