"""Small fakes of the core's ports (and the model gate's store), for tests on fakes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.llm import LLMReply, LLMRequest
from agent.models import TaskSpec
from agent.sandbox import ExecResult, PoolStats
from workers.gateplan import FleetState, GateConfig, Grant, Report, plan


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
    pool_hit: bool = False

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        if self.raises is not None:
            raise self.raises
        self.executed.append(code)
        return self.results.get(code, ExecResult(duration_s=0.25))

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeProvider:
    """``agent.sandbox.SandboxProvider`` handing out ``FakeSandbox``es (``make`` builds each,
    given the spec); records what was started and whether the pool and housekeeping ran."""

    make: Callable[[TaskSpec], FakeSandbox] = lambda spec: FakeSandbox()
    backend: str = "fake"
    started: list[tuple[str, FakeSandbox]] = field(default_factory=list)
    pool_started: bool = False
    housekeeping_started: bool = False
    closed: bool = False

    def start(self, spec: TaskSpec, task_id: str) -> FakeSandbox:
        sandbox = self.make(spec)
        self.started.append((task_id, sandbox))
        return sandbox

    def start_pool(self) -> None:
        self.pool_started = True

    def pool_stats(self) -> PoolStats:
        return PoolStats()

    def start_housekeeping(self, is_worker_alive: Callable[[str], bool]) -> int:
        self.housekeeping_started = True
        return 0

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


class MemoryGateStore:
    """``workers.gatestore.GateStore`` in memory: the fleet's rules (``plan``) on one state,
    with a settable clock (ms) and a switch to make syncs fail as if Redis were away."""

    def __init__(self, now_ms: int = 0) -> None:
        self.state: FleetState | None = None
        self.now_ms = now_ms
        self.failing: Exception | None = None
        self.syncs = 0
        self.left: list[str] = []
        self._lock = threading.Lock()

    def sync(self, holder: str, report: Report, config: GateConfig) -> Grant:
        with self._lock:
            if self.failing is not None:
                raise self.failing
            state = self.state or FleetState(float(config.cap))
            self.state, grant = plan(state, holder, report, self.now_ms, config)
            self.syncs += 1
            return grant

    def leave(self, holder: str) -> None:
        with self._lock:
            self.left.append(holder)
            if self.state is not None:
                holders = {h: v for h, v in self.state.holders.items() if h != holder}
                self.state = FleetState(self.state.limit, self.state.epoch, holders)
