"""The CodeAct loop: a generator of steps.

``run_codeact`` asks the model for a reply, parses it, runs its code in the sandbox and
feeds the observation back, until the model answers or a limit is reached. It does no I/O
of its own: the model and the sandbox are ports, time comes from a ``Clock``.

Every step yields the event to publish and a ``Checkpoint`` of the whole state after it.
The caller stores both before it asks for the next step, so a task whose worker died can
resume from the last stored checkpoint: ``cells`` (every code cell run so far) are replayed
into the new sandbox to rebuild its state, and the loop carries on after the last step, so
no step is ever published twice.

The model's mistakes are values (observations, a failed status); infrastructure faults
(``LLMError``, ``SandboxError``) propagate for the caller to retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent import actions, graders, prompts
from agent.errors import GradingError, LLMRejected, SetupError
from agent.events import Event, EventType, bound
from agent.llm import LLM, LLMRequest
from agent.models import FailureClass, Result, Status, TaskSpec, Timings, Usage
from agent.observation import format_observation
from agent.sandbox import Sandbox

NO_ACTION_LIMIT = 3  # consecutive replies with neither code nor answer before giving up
REPEAT_LIMIT = 3  # the same failing code this many times in a row means the model is stuck
REPLAY_OUTPUT_CHARS = 200


class Clock(Protocol):
    def time(self) -> float: ...


class _SystemClock:
    def time(self) -> float:
        import time

        return time.time()


SYSTEM_CLOCK: Clock = _SystemClock()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The loop's whole state after a step; JSON-serialisable via ``to_dict``."""

    turn: int = 0
    messages: tuple[Mapping[str, str], ...] = ()
    cells: tuple[str, ...] = ()
    pending_code: str | None = None  # parsed from the last reply, not yet run
    usage: Usage = field(default_factory=Usage)
    llm_s: float = 0.0
    exec_s: float = 0.0
    no_action_streak: int = 0
    failing_code: str | None = None  # the last cell, if it failed
    failing_streak: int = 0
    seen: tuple[str, ...] = ()  # digests of (cell, observation) pairs the model has read

    def to_dict(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "messages": [dict(m) for m in self.messages],
            "cells": list(self.cells),
            "pending_code": self.pending_code,
            "usage": self.usage.to_dict(),
            "llm_s": self.llm_s,
            "exec_s": self.exec_s,
            "no_action_streak": self.no_action_streak,
            "failing_code": self.failing_code,
            "failing_streak": self.failing_streak,
            "seen": list(self.seen),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Checkpoint:
        return cls(
            turn=int(d["turn"]),
            messages=tuple(dict(m) for m in d["messages"]),
            cells=tuple(d.get("cells") or ()),
            pending_code=d.get("pending_code"),
            usage=Usage.from_dict(d.get("usage") or {}),
            llm_s=float(d.get("llm_s", 0.0)),
            exec_s=float(d.get("exec_s", 0.0)),
            no_action_streak=int(d.get("no_action_streak", 0)),
            failing_code=d.get("failing_code"),
            failing_streak=int(d.get("failing_streak", 0)),
            seen=tuple(d.get("seen") or ()),
        )


@dataclass(frozen=True, slots=True)
class Step:
    """An event to publish and the state after it. ``final``: the task ends with this step
    (a reply with an answer and no code): only grading follows it, so whoever publishes may
    write it together with the result."""

    event: Event
    checkpoint: Checkpoint
    final: bool = False


def run_codeact(
    spec: TaskSpec,
    llm: LLM,
    sandbox: Sandbox,
    *,
    model: str,
    attempt: int = 1,
    started_at: float | None = None,
    resume: Checkpoint | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    clock: Clock = SYSTEM_CLOCK,
    regex: graders.RegexEngine | None = None,
) -> Generator[Step, None, Result]:
    """Run one task; yield a ``Step`` per model reply and per execution; return the result.

    ``started_at`` (unix seconds) is when the task first started: the wall-clock limit
    spans attempts. ``cancelled`` is polled before every model call and execution.
    ``regex`` is the engine of the regex grader (without one, regex answers are not
    graded: a grading failure).
    """
    loop = _Loop(spec, llm, sandbox, model, attempt, clock, cancelled, regex)
    start = clock.time() if started_at is None else started_at
    return (yield from loop.run(start, resume))


class _Loop:
    def __init__(
        self,
        spec: TaskSpec,
        llm: LLM,
        sandbox: Sandbox,
        model: str,
        attempt: int,
        clock: Clock,
        cancelled: Callable[[], bool],
        regex: graders.RegexEngine | None = None,
    ) -> None:
        self.spec = spec
        self.regex = regex
        self.llm = llm
        self.sandbox = sandbox
        self.model = model
        self.attempt = attempt
        self.clock = clock
        self.cancelled = cancelled
        self.limits = spec.limits
        self.format = spec.action_format
        self.stops = actions.stop_sequences(spec.action_format)
        self.tool_names = frozenset(t.name for t in spec.tools)
        self.state = Checkpoint()
        self.deadline = 0.0
        self.started_at = 0.0

    # -- driver -----------------------------------------------------------------------

    def run(self, started_at: float, resume: Checkpoint | None) -> Generator[Step, None, Result]:
        self.started_at = started_at
        self.deadline = started_at + self.limits.timeout_s
        if resume is None:
            self.state = Checkpoint(
                messages=(
                    {"role": "system", "content": prompts.system_prompt(self.spec)},
                    {"role": "user", "content": self.spec.prompt},
                )
            )
        else:
            self.state = resume
            try:
                self._replay(resume.cells)
            except SetupError as e:
                return self._finish(Status.FAILED, FailureClass.SETUP_ERROR, error=str(e))
            if resume.pending_code is not None:
                outcome = yield from self._execute(resume.pending_code)
                if outcome is not None:
                    return outcome

        while self.state.turn < self.limits.max_turns:
            stop = self._should_stop()
            if stop is not None:
                return stop
            outcome = yield from self._turn()
            if outcome is not None:
                return outcome
        return self._finish(
            Status.FAILED,
            FailureClass.MAX_TURNS,
            error=f"no answer after {self.limits.max_turns} turns",
        )

    def _should_stop(self) -> Result | None:
        if self.cancelled():
            return self._finish(Status.CANCELLED, FailureClass.CANCELLED, error="cancelled")
        if self.clock.time() >= self.deadline:
            return self._timed_out()
        budget = self.limits.max_tokens
        if budget is not None and self.state.usage.total_tokens >= budget:
            return self._finish(
                Status.FAILED,
                FailureClass.TOKEN_BUDGET,
                error=f"token budget of {budget} spent ({self.state.usage.total_tokens} used)",
            )
        return None

    def _timed_out(self) -> Result:
        return self._finish(
            Status.TIMED_OUT,
            FailureClass.TIMEOUT,
            error=f"the task's wall-clock limit of {self.limits.timeout_s:g}s was reached",
        )

    # -- one turn -----------------------------------------------------------------------

    def _turn(self) -> Generator[Step, None, Result | None]:
        turn = self.state.turn + 1
        max_tokens = self.spec.llm.max_tokens_per_turn
        if self.limits.max_tokens is not None:
            max_tokens = max(
                1, min(max_tokens, self.limits.max_tokens - self.state.usage.total_tokens)
            )
        request = LLMRequest(
            model=self.model,
            messages=self.state.messages,
            temperature=self.spec.llm.temperature,
            max_tokens=max_tokens,
            seed=self.spec.llm.seed,
            stop=self.stops,
            timeout_s=max(self.deadline - self.clock.time(), 0.001),
        )
        try:
            reply = self.llm.complete(request)
        except LLMRejected as e:
            return self._finish(Status.ERROR, FailureClass.LLM_REJECTED, error=str(e))
        except Exception:
            if self.clock.time() >= self.deadline:
                return self._timed_out()
            raise
        # A server that ignored the stop sequences sent what the model wrote after its
        # action too, such as an observation it made up: that part is dropped.
        content, dropped = actions.cut_at_stop(reply.content, self.stops)
        action = actions.parse(content, self.format, self.tool_names)
        usage = self.state.usage + Usage(reply.prompt_tokens, reply.completion_tokens, 1)
        messages = [
            *self.state.messages,
            {"role": "assistant", "content": actions.complete_transcript(content, self.format)},
        ]
        no_action_streak = 0
        if action.kind == "none":
            no_action_streak = self.state.no_action_streak + 1
            if action.problem is not None:
                note = prompts.problem_note(action.problem, self.format)
            else:
                note = prompts.nudge(self.format)
            messages.append({"role": "user", "content": self._opening(note, turn)})
        self.state = replace(
            self.state,
            turn=turn,
            messages=tuple(messages),
            usage=usage,
            llm_s=self.state.llm_s + reply.latency_s,
            pending_code=action.code,
            no_action_streak=no_action_streak,
        )
        data: dict[str, Any] = {
            "content": content,
            "action": action.kind,
            "finish_reason": reply.finish_reason,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "latency_s": round(reply.latency_s, 6),
        }
        if action.code is not None:
            data["code"] = action.code
        if action.answer is not None:
            data["answer"] = action.answer
        if action.problem is not None:
            data["problem"] = action.problem
        if dropped:
            data["dropped"] = dropped
        answers = action.code is None and action.answer is not None
        yield self._step(EventType.LLM_REPLY, data, final=answers)

        if action.code is not None:
            return (
                yield from self._execute(action.code, ignored_solution=action.answer is not None)
            )
        if action.answer is not None:
            return self._answered(action.answer)
        if no_action_streak >= NO_ACTION_LIMIT:
            return self._finish(
                Status.FAILED,
                FailureClass.NO_ACTION,
                error=f"{no_action_streak} replies in a row with neither code nor an answer",
            )
        return None

    def _execute(
        self, code: str, ignored_solution: bool = False
    ) -> Generator[Step, None, Result | None]:
        if self.cancelled():
            return self._finish(Status.CANCELLED, FailureClass.CANCELLED, error="cancelled")
        remaining = self.deadline - self.clock.time()
        if remaining <= 0:
            return self._timed_out()
        try:
            result = self.sandbox.execute(
                code, min(self.limits.exec_timeout_s, remaining), self.limits.max_output_chars
            )
        except SetupError as e:
            return self._finish(Status.FAILED, FailureClass.SETUP_ERROR, error=str(e))
        observation = format_observation(result, self.limits.max_output_chars)
        failing = result.error is not None or result.timed_out or result.state_lost
        seen = self.state.seen
        if not failing:
            digest = _digest(code, observation)
            if digest in seen:
                observation += "\n" + prompts.repeated_note(self.format)
            else:
                seen = (*seen, digest)
        if ignored_solution:
            observation += "\n" + prompts.IGNORED_SOLUTION
        observation = self._opening(observation, self.state.turn)
        streak = (
            self.state.failing_streak + 1
            if failing and code == self.state.failing_code
            else int(failing)
        )
        self.state = replace(
            self.state,
            messages=(*self.state.messages, {"role": "user", "content": observation}),
            cells=(*self.state.cells, code) if not result.state_lost else (),
            pending_code=None,
            exec_s=self.state.exec_s + result.duration_s,
            failing_code=code if failing else None,
            failing_streak=streak,
            seen=seen,
        )
        yield self._step(EventType.EXEC_RESULT, {**result.to_dict(), "observation": observation})
        if self.cancelled():
            return self._finish(Status.CANCELLED, FailureClass.CANCELLED, error="cancelled")
        if streak >= REPEAT_LIMIT:
            return self._finish(
                Status.FAILED,
                FailureClass.STUCK,
                error=f"the same failing code was run {streak} times in a row",
            )
        return None

    def _opening(self, message: str, turn_done: int) -> str:
        """The user message after turn ``turn_done``, told so when the next is the last."""
        if turn_done + 1 == self.limits.max_turns:
            return message + "\n" + prompts.last_turn_note(self.format)
        return message

    def _replay(self, cells: tuple[str, ...]) -> None:
        """Rebuild a fresh sandbox's state by running the cells of earlier turns again."""
        for code in cells:
            self.sandbox.execute(code, self.limits.exec_timeout_s, REPLAY_OUTPUT_CHARS)

    # -- endings ------------------------------------------------------------------------

    def _answered(self, answer: str) -> Result:
        expected = self.spec.expected
        if expected is None:
            return self._finish(Status.COMPLETED, None, answer=answer)
        try:
            correct = graders.grade(expected, answer, self.regex)
        except GradingError as e:
            return self._finish(
                Status.COMPLETED,
                FailureClass.GRADING_ERROR,
                answer=answer,
                correct=False,
                error=f"the answer could not be graded: {e}",
            )
        failure = None if correct else FailureClass.WRONG_ANSWER
        return self._finish(Status.COMPLETED, failure, answer=answer, correct=correct)

    def _finish(
        self,
        status: Status,
        failure: FailureClass | None,
        *,
        answer: str | None = None,
        correct: bool | None = None,
        error: str | None = None,
    ) -> Result:
        s = self.state
        return Result(
            status=status,
            failure_class=failure,
            answer=answer,
            correct=correct,
            turns=s.turn,
            usage=s.usage,
            timings=Timings(
                llm_s=s.llm_s, exec_s=s.exec_s, total_s=self.clock.time() - self.started_at
            ),
            attempt=self.attempt,
            messages=s.messages,
            error=error,
        )

    def _step(self, kind: EventType, data: dict[str, Any], final: bool = False) -> Step:
        event = Event(kind, self.state.turn, self.attempt, self.clock.time(), bound(data))
        return Step(event, self.state, final)


def _digest(code: str, observation: str) -> str:
    return hashlib.sha256(f"{code.strip()}\0{observation}".encode()).hexdigest()[:16]


def finished_event(result: Result, ts: float) -> Event:
    """The ``task.finished`` event for a result (the trajectory itself stays out of it)."""
    data = {k: v for k, v in result.to_dict().items() if k != "messages"}
    return Event(EventType.FINISHED, result.turns, result.attempt, ts, bound(data))
