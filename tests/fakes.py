"""Small fakes of the core's ports, for tests of the pure engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.llm import LLMReply, LLMRequest
from agent.sandbox import ExecResult


class ScriptedLLM:
    """Replies in order; a reply may be a function of the request (to react to it)."""

    def __init__(self, replies: Sequence[str | Callable[[LLMRequest], str] | Exception]) -> None:
        self.replies = list(replies)
        self.requests: list[LLMRequest] = []

    def complete(self, request: LLMRequest) -> LLMReply:
        self.requests.append(request)
        reply = self.replies.pop(0) if self.replies else "I have nothing more to say."
        if isinstance(reply, Exception):
            raise reply
        text = reply(request) if callable(reply) else reply
        return LLMReply(text, "stop", prompt_tokens=10, completion_tokens=5, latency_s=0.5)


@dataclass
class FakeSandbox:
    """Answers executions from a table of code -> result (default: empty output)."""

    results: dict[str, ExecResult] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    closed: bool = False
    raises: Exception | None = None

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        if self.raises is not None:
            raise self.raises
        self.executed.append(code)
        return self.results.get(code, ExecResult(duration_s=0.25))

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self, now: float = 1_000.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def time(self) -> float:
        self.now += self.step
        return self.now


class PythonRegex:
    """A ``RegexEngine`` on Python's ``re``, for tests whose patterns are harmless."""

    def search(self, pattern: str, text: str) -> bool:
        import re

        return re.search(pattern, text) is not None
