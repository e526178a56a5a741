"""One typed settings object per process, read from ``ACTFLEET_*`` environment variables.

Build it once at start-up (``Settings()``) and pass it down; nothing reads the environment
at import time. The model server is configured by the ``openai`` SDK's own
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, which are deliberately not fields here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.destinations import Allowlist


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

    # api
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_tasks: int = 20_000
    max_active_per_tenant: int = 10_000
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
    def allowlist(self) -> Allowlist:
        """``webhook_allowlist``, parsed."""
        return Allowlist.parse(self.webhook_allowlist)
