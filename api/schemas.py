"""Pydantic models for the OpenAPI document and the responses.

Requests are *validated* by ``agent.models.TaskSpec.from_dict`` (one validator for HTTP,
JSONL and the CLI); ``TaskSpecIn`` only documents the request body's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ToolIn(BaseModel):
    name: str
    signature: str = ""
    description: str = ""


class FileIn(BaseModel):
    path: str = Field(description="relative path inside the sandbox work dir")
    content_b64: str


class LimitsIn(BaseModel):
    max_turns: int = Field(10, ge=1, le=200)
    timeout_s: float = Field(900, ge=1, le=86_400)
    exec_timeout_s: float = Field(30, ge=0.1, le=3600)
    max_output_chars: int = Field(2000, ge=100, le=1_000_000)
    max_tokens: int | None = None


class SandboxIn(BaseModel):
    image: str | None = None
    network: bool = False
    memory_mb: int = Field(512, ge=64, le=65_536)
    cpus: float = Field(1.0, ge=0.1, le=64)


class LLMIn(BaseModel):
    temperature: float = Field(0, ge=0, le=2)
    max_tokens_per_turn: int = 1024
    seed: int | None = None


class ExpectedIn(BaseModel):
    answer: Any
    grader: Literal["exact", "numeric", "contains", "regex", "python_literal"] = "exact"
    tolerance: float | None = None


class WebhookIn(BaseModel):
    url: str


class TaskSpecIn(BaseModel):
    """A task spec (one line of a batch file)."""

    prompt: str
    custom_id: str | None = Field(None, description="your id; unique within a batch")
    model: str | None = None
    system_prompt: str | None = None
    setup_code: str | None = Field(None, description="Python run in the sandbox before turn 1")
    tools: list[ToolIn] = []
    files: list[FileIn] = []
    limits: LimitsIn | None = None
    sandbox: SandboxIn | None = None
    llm: LLMIn | None = None
    expected: ExpectedIn | None = None
    action_format: Literal["code", "json", "text"] = "code"
    webhook: WebhookIn | None = None
    metadata: dict[str, str] = {}


class UsageOut(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    llm_calls: int = 0


class ResultOut(BaseModel):
    status: str
    failure_class: str | None = None
    answer: str | None = None
    correct: bool | None = None
    turns: int = 0
    usage: UsageOut
    timings: dict[str, float]
    attempt: int = 1
    messages: list[dict[str, Any]] = []
    error: str | None = None


class TaskOut(BaseModel):
    id: str
    custom_id: str | None = None
    batch_id: str | None = None
    status: Literal["queued", "running", "completed", "failed", "error", "cancelled", "timed_out"]
    attempt: int
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool
    metadata: dict[str, str] = {}
    result: ResultOut | None = None


class TaskAccepted(BaseModel):
    id: str
    status: str = "queued"
    events_url: str
    url: str


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class BatchAccepted(BaseModel):
    id: str
    total: int
    status: str = "running"
    url: str
    results_url: str


class BatchUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BatchOut(BaseModel):
    id: str
    status: Literal["running", "finished", "cancelling", "cancelled"]
    total: int
    finished: int
    counts: dict[str, int] = Field(description="tasks per status")
    success_rate: float | None = Field(
        None, description="completed and not graded wrong, over finished; null until one finishes"
    )
    mean_turns: float | None = None
    usage: BatchUsage
    created_at: float
    cancel_requested: bool


class BatchCancelled(BaseModel):
    id: str
    cancelled: int = Field(description="queued tasks cancelled at once")
    stopping: int = Field(description="running tasks told to stop (they stop within seconds)")
    already_finished: int


class ErrorDetail(BaseModel):
    message: str
    problems: list[str] | None = None
    errors: list[dict[str, Any]] | None = None


class ErrorOut(BaseModel):
    detail: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "missing or invalid API key"},
    404: {"model": ErrorOut, "description": "no such object for this API key"},
}
