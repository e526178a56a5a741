"""The LLM port: one chat completion.

Adapters (``workers.llm`` for the ``openai`` SDK, fakes in tests) turn transport faults into
``LLMError`` / ``LLMRejected`` and retry transient ones themselves, with backoff.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LLMRequest:
    model: str
    messages: Sequence[Mapping[str, str]]
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None  # what is left of the task's wall clock, if bounded


@dataclass(frozen=True, slots=True)
class LLMReply:
    content: str
    finish_reason: str | None = None  # "stop", "length", ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0


class LLM(Protocol):
    def complete(self, request: LLMRequest) -> LLMReply: ...
