"""The task spec, the result record and the statuses: the public contract (described in
README.md, "What a task is").

Everything here is a frozen dataclass. ``TaskSpec.from_dict`` is the single place where a
task spec from the outside world (HTTP, a JSONL line, a CLI flag) is checked: it collects
every problem, each phrased as ``field: what to fix``, and raises one ``SpecError``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from agent.destinations import DestinationError, parse_url
from agent.errors import InfrastructureError, LLMError, LLMRejected, SpecError
from agent.specfast import ASK, fast_fields
from agent.specschema import (
    ACTION_FORMATS,
    GRADERS,
    INVALID,
    MAX_FILES_BYTES,
    TASK_SPEC,
    Checker,
    Section,
    problems_anywhere,
    type_name,
)
from agent.text import replace_unencodable

__all__ = ["ACTION_FORMATS", "GRADERS", "MAX_FILES_BYTES"]


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


TERMINAL_STATUSES = tuple(s for s in Status if s.terminal)


class FailureClass(StrEnum):
    """Why a task did not end with a correct answer. ``None`` on a result means it did."""

    WRONG_ANSWER = "wrong_answer"  # completed, graded, incorrect
    GRADING_ERROR = "grading_error"  # completed, but the answer could not be graded
    MAX_TURNS = "max_turns"  # failed: out of turns without an answer
    STUCK = "stuck"  # failed: repeated the same failing action
    NO_ACTION = "no_action"  # failed: kept replying with neither code nor answer
    TOKEN_BUDGET = "token_budget"  # failed: limits.max_tokens spent
    SETUP_ERROR = "setup_error"  # failed: the task's setup_code raised
    TIMEOUT = "timeout"  # timed_out: limits.timeout_s of wall clock spent
    LLM_ERROR = "llm_error"  # error: the model server kept failing
    LLM_REJECTED = "llm_rejected"  # error: the model server refused the request
    SANDBOX_ERROR = "sandbox_error"  # error: the sandbox kept failing
    WORKER_LOST = "worker_lost"  # error: the task kept killing its worker
    INTERNAL = "internal"  # error: a bug of ours
    CANCELLED = "cancelled"  # cancelled by the caller

    @classmethod
    def of_fault(cls, error: InfrastructureError) -> FailureClass:
        """The failure class of a task that ended on an infrastructure fault."""
        if isinstance(error, LLMRejected):
            return cls.LLM_REJECTED
        if isinstance(error, LLMError):
            return cls.LLM_ERROR
        return cls.SANDBOX_ERROR


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    signature: str = ""
    description: str = ""


@dataclass(frozen=True, slots=True)
class FileSpec:
    path: str
    content_b64: str

    def content(self) -> bytes:
        return base64.b64decode(self.content_b64)


@dataclass(frozen=True, slots=True)
class Limits:
    max_turns: int = 10
    timeout_s: float = 900.0
    exec_timeout_s: float = 30.0
    max_output_chars: int = 2000
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    image: str | None = None
    network: bool = False
    memory_mb: int = 512
    cpus: float = 1.0


@dataclass(frozen=True, slots=True)
class LLMParams:
    temperature: float = 0.0
    max_tokens_per_turn: int = 1024
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Expected:
    answer: Any
    grader: str = "exact"
    tolerance: float | None = None


@dataclass(frozen=True, slots=True)
class Webhook:
    """Where ``task.finished`` is POSTed. Its syntax is checked with the spec
    (``agent.destinations.parse_url``); where it may point is the server's policy."""

    url: str


@dataclass(frozen=True, slots=True)
class TaskSpec:
    prompt: str
    custom_id: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    setup_code: str | None = None
    tools: tuple[Tool, ...] = ()
    files: tuple[FileSpec, ...] = ()
    limits: Limits = field(default_factory=Limits)
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    llm: LLMParams = field(default_factory=LLMParams)
    expected: Expected | None = None
    action_format: str = "code"
    webhook: Webhook | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``from_dict(to_dict())`` gives an equal spec."""
        d = asdict(self)
        d["tools"] = [asdict(t) for t in self.tools]
        d["files"] = [asdict(f) for f in self.files]
        d["metadata"] = dict(self.metadata)
        return {k: v for k, v in d.items() if v is not None}

    def to_stored(self) -> dict[str, Any]:
        """The compact JSON form a record stores: ``to_dict`` without the fields (and
        sub-fields) that equal their defaults; ``from_stored(to_stored())`` gives an equal
        spec. Queued tasks are most of a busy store's memory, and most specs leave most
        fields at their defaults."""
        d: dict[str, Any] = {"prompt": self.prompt}
        for name in ("custom_id", "model", "system_prompt", "setup_code"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.tools:
            d["tools"] = [{"name": t.name, **_changed(t)} for t in self.tools]
        if self.files:
            d["files"] = [{"path": f.path, "content_b64": f.content_b64} for f in self.files]
        for name, default in (("limits", _LIMITS), ("sandbox", _SANDBOX), ("llm", _LLM)):
            section = getattr(self, name)
            changed = {} if section is default else _changed(section)
            if changed:
                d[name] = changed
        if self.expected is not None:
            d["expected"] = {"answer": self.expected.answer, **_changed(self.expected)}
        if self.action_format != "code":
            d["action_format"] = self.action_format
        if self.webhook is not None:
            d["webhook"] = {"url": self.webhook.url}
        if self.metadata:
            d["metadata"] = dict(self.metadata)
        return d

    @classmethod
    def from_dict(cls, raw: object, table: Section = TASK_SPEC, *, plain: bool = False) -> TaskSpec:
        """Check and build a spec; raise ``SpecError`` listing every problem. ``table`` is
        ``specschema.TASK_SPEC``, or a server's narrowing of it. ``plain``: the caller knows
        ``raw`` holds no unencodable text and nests at most ``MAX_DEPTH`` deep (e.g. it was
        parsed from UTF-8 JSON without a ``\\u`` escape and with that few brackets), so
        that check is skipped."""
        return _SpecReader(raw, table, plain).read()

    @classmethod
    def from_stored(cls, raw: object) -> TaskSpec:
        """Rebuild a stored spec, which passed the rules of its day: text UTF-8 cannot
        encode is replaced (U+FFFD), a field that today's rules refuse takes its default.
        ``SpecError`` only if ``raw`` is not an object."""
        return _SpecReader(replace_unencodable(raw), TASK_SPEC).read(strict=False)


_DEFAULTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _changed(obj: Any) -> dict[str, Any]:
    """The fields of a dataclass that have a default and differ from it (None omitted)."""
    defaults = _DEFAULTS.get(type(obj))
    if defaults is None:
        defaults = _DEFAULTS[type(obj)] = tuple(
            (f.name, f.default) for f in fields(obj) if f.default is not MISSING
        )
    out = {}
    for name, default in defaults:
        value = getattr(obj, name)
        if value is not None and value != default:
            out[name] = value
    return out


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.llm_calls + other.llm_calls,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "llm_calls": self.llm_calls,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Usage:
        return cls(
            int(d.get("prompt_tokens", 0)),
            int(d.get("completion_tokens", 0)),
            int(d.get("llm_calls", 0)),
        )


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent, by where. ``total_s`` is wall clock from start to finish."""

    queue_s: float = 0.0
    sandbox_s: float = 0.0
    llm_s: float = 0.0
    exec_s: float = 0.0
    total_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Timings:
        return cls(**{k: float(d.get(k, 0.0)) for k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class Result:
    """The terminal record of one task."""

    status: Status
    failure_class: FailureClass | None = None
    answer: str | None = None
    correct: bool | None = None
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    attempt: int = 1
    messages: tuple[Mapping[str, str], ...] = ()
    error: str | None = None  # a human-readable reason for error/failed statuses

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "failure_class": self.failure_class.value if self.failure_class else None,
            "answer": self.answer,
            "correct": self.correct,
            "turns": self.turns,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
            "attempt": self.attempt,
            "messages": [dict(m) for m in self.messages],
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        fc = d.get("failure_class")
        return cls(
            status=Status(d["status"]),
            failure_class=FailureClass(fc) if fc else None,
            answer=d.get("answer"),
            correct=d.get("correct"),
            turns=int(d.get("turns", 0)),
            usage=Usage.from_dict(d.get("usage") or {}),
            timings=Timings.from_dict(d.get("timings") or {}),
            attempt=int(d.get("attempt", 1)),
            messages=tuple(d.get("messages") or ()),
            error=d.get("error"),
        )


class _SpecReader:
    """Reads one raw task spec against a table (``agent.specschema``), then checks what a
    table cannot say; collects every problem instead of stopping at the first."""

    def __init__(self, raw: object, table: Section, plain: bool = False) -> None:
        self.raw = raw
        self.table = table
        self.plain = plain
        self.checker = Checker()

    def fail(self, where: str, what: str) -> None:
        self.checker.fail(where, what)

    def read(self, strict: bool = True) -> TaskSpec:
        """The spec; with ``strict`` (the default) a ``SpecError`` if anything is wrong,
        without it the spec made of the valid fields (for records stored under older
        rules)."""
        raw = self.raw
        if not isinstance(raw, Mapping):
            raise SpecError([f"task: expected a JSON object, got {type_name(raw)}"])
        if not self.plain:
            self.checker.problems.extend(problems_anywhere(raw))
        v = fast_fields(self.table)(raw)
        if v is ASK:  # a problem, or a shape the fast check leaves to the checker
            v, _ = self.checker.fields(self.table, raw, "")
        spec = TaskSpec(
            prompt=v.get("prompt", ""),
            custom_id=v.get("custom_id"),
            model=v.get("model"),
            system_prompt=v.get("system_prompt"),
            setup_code=v.get("setup_code"),
            tools=tuple(Tool(**t) for t in _valid(v.get("tools"))),
            files=self.files(v.get("files")),
            limits=Limits(**v["limits"]) if "limits" in v else _LIMITS,
            sandbox=SandboxSpec(**v["sandbox"]) if "sandbox" in v else _SANDBOX,
            llm=LLMParams(**v["llm"]) if "llm" in v else _LLM,
            expected=self.expected(v.get("expected")),
            action_format=v.get("action_format", "code"),
            webhook=self.webhook(v.get("webhook")),
            metadata=v.get("metadata", {}),
        )
        if strict and self.checker.problems:
            raise SpecError(self.checker.problems)
        return spec

    def files(self, value: list[Any] | None) -> tuple[FileSpec, ...]:
        """The files; a path may not be both a file and a directory of another file's path,
        and together they hold at most ``MAX_FILES_BYTES``."""
        out = []
        total = 0
        kinds: dict[str, tuple[str, int]] = {}  # path -> ("file" | "dir", first index)
        for i, f in enumerate(value or ()):
            if f is INVALID:
                continue
            path, content = f["path"], f["content_b64"]
            parts = path.split("/")
            for j in range(1, len(parts)):
                parent = "/".join(parts[:j])
                kind, k = kinds.setdefault(parent, ("dir", i))
                if kind == "file":
                    self.fail(
                        f"files[{i}].path", f"{parent!r} is a file (files[{k}]), not a directory"
                    )
            kind, k = kinds.get(path, ("file", i))
            if kind == "dir":
                self.fail(f"files[{i}].path", f"{path!r} is a directory of files[{k}]'s path")
            kinds[path] = ("file", i)
            total += len(content) // 4 * 3 - content[-2:].count("=")
            out.append(FileSpec(path=path, content_b64=content))
        if total > MAX_FILES_BYTES:
            self.fail("files", f"hold {total} bytes; the limit is {MAX_FILES_BYTES}")
        return tuple(out)

    def expected(self, value: dict[str, Any] | None) -> Expected | None:
        if value is None:
            return None
        expected = Expected(
            answer=value["answer"],
            grader=value.get("grader", "exact"),
            tolerance=value.get("tolerance"),
        )
        if expected.grader == "regex" and not isinstance(expected.answer, str):
            self.fail(
                "expected.answer",
                f"must be a string (the pattern) when grader is regex, got "
                f"{type_name(expected.answer)}",
            )
        return expected

    def webhook(self, value: dict[str, Any] | None) -> Webhook | None:
        if value is None:
            return None
        url = value["url"]
        try:
            parse_url(url)  # the syntax; where it may point is the server's policy
        except DestinationError as e:
            self.fail("webhook.url", e.reason)
        return Webhook(url=url)


# the sections of a spec that leaves them out (frozen, so every such spec shares them)
_LIMITS, _SANDBOX, _LLM = Limits(), SandboxSpec(), LLMParams()


def _valid(items: list[Any] | None) -> list[Any]:
    return [i for i in items or () if i is not INVALID]
