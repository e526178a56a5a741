"""Pydantic models of the responses, for the OpenAPI document and response validation.

Request bodies are task specs, validated by ``agent.models.TaskSpec.from_dict`` (one
validator for HTTP, JSONL and the CLI) and documented by schemas generated from the same
table (``agent.specschema``; see ``api.openapi``), referred to here by ``SPEC_REF``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

REF_PREFIX = "#/components/schemas/"
SPEC_REF = REF_PREFIX + "TaskSpec"  # generated from agent.specschema (api.openapi)
BATCH_REF = REF_PREFIX + "Batch"


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
    422: {"model": ErrorOut, "description": "invalid input; `problems` says what to fix"},
    503: {"model": ErrorOut, "description": "the store is unavailable; see Retry-After"},
}
