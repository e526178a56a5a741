"""The task spec, the result record and the statuses: the public contract of DESIGN.md.

Everything here is a frozen dataclass. ``TaskSpec.from_dict`` is the single place where a
task spec from the outside world (HTTP, a JSONL line, a CLI flag) is checked: it collects
every problem, each phrased as ``field: what to fix``, and raises one ``SpecError``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from agent.destinations import MAX_URL_CHARS, DestinationError, parse_url
from agent.errors import InfrastructureError, LLMError, LLMRejected, SpecError

GRADERS = ("exact", "numeric", "contains", "regex", "python_literal")
ACTION_FORMATS = ("code", "json", "text")

MAX_PROMPT_CHARS = 200_000
MAX_SETUP_CODE_CHARS = 200_000
MAX_FILES = 64
MAX_FILES_BYTES = 8 * 1024 * 1024
MAX_TOOLS = 64
MAX_METADATA_ITEMS = 32
_CUSTOM_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")


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

    @classmethod
    def from_dict(cls, raw: object) -> TaskSpec:
        """Check and build a spec; raise ``SpecError`` listing every problem."""
        return _SpecReader(raw).read()


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
    """Reads one raw task spec, collecting problems instead of stopping at the first."""

    def __init__(self, raw: object) -> None:
        self.raw = raw
        self.problems: list[str] = []

    def fail(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def read(self) -> TaskSpec:
        raw = self.raw
        if not isinstance(raw, Mapping):
            raise SpecError([f"task: expected a JSON object, got {_type_name(raw)}"])
        known = set(TaskSpec.__dataclass_fields__)
        for key in raw:
            if key not in known:
                self.fail(str(key), f"unknown field (known fields: {', '.join(sorted(known))})")
        prompt = self.string(raw, "prompt", "prompt", required=True, max_len=MAX_PROMPT_CHARS)
        if prompt is not None and not prompt.strip():
            self.fail("prompt", "must not be blank")
        custom_id = self.string(raw, "custom_id", "custom_id")
        if custom_id is not None and not _CUSTOM_ID.match(custom_id):
            self.fail("custom_id", "use 1-128 characters from letters, digits and ._:/@+=-")
        spec = TaskSpec(
            prompt=prompt or "",
            custom_id=custom_id,
            model=self.string(raw, "model", "model", max_len=256),
            system_prompt=self.string(raw, "system_prompt", "system_prompt", MAX_PROMPT_CHARS),
            setup_code=self.string(raw, "setup_code", "setup_code", MAX_SETUP_CODE_CHARS),
            tools=self.tools(raw.get("tools")),
            files=self.files(raw.get("files")),
            limits=self.limits(raw.get("limits")),
            sandbox=self.sandbox(raw.get("sandbox")),
            llm=self.llm(raw.get("llm")),
            expected=self.expected(raw.get("expected")),
            action_format=self.choice(raw, "action_format", ACTION_FORMATS, "code"),
            webhook=self.webhook(raw.get("webhook")),
            metadata=self.metadata(raw.get("metadata")),
        )
        if self.problems:
            raise SpecError(self.problems)
        return spec

    # -- scalar helpers ---------------------------------------------------------------

    def string(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: str,
        max_len: int = 10_000,
        required: bool = False,
    ) -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                self.fail(where, "is required")
            return None
        if not isinstance(value, str):
            self.fail(where, f"expected a string, got {_type_name(value)}")
            return None
        if len(value) > max_len:
            self.fail(where, f"is {len(value)} characters; the limit is {max_len}")
            return None
        return value

    def number(
        self,
        obj: Mapping[str, Any],
        key: str,
        where: str,
        default: Any,
        lo: float,
        hi: float,
        integer: bool = False,
    ) -> Any:
        value = obj.get(key, default)
        if value is None:
            return default
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            self.fail(where, f"expected {kind}, got {_type_name(value)}")
            return default
        if not lo <= value <= hi:
            self.fail(where, f"must be between {lo:g} and {hi:g}, got {value}")
            return default
        return int(value) if integer else float(value)

    def boolean(self, obj: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        value = obj.get(key, default)
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {_type_name(value)}")
            return default
        return value

    def choice(
        self, obj: Mapping[str, Any], key: str, options: tuple[str, ...], default: str
    ) -> str:
        value = obj.get(key, default)
        if value not in options:
            self.fail(key, f"must be one of {', '.join(options)}, got {value!r}")
            return default
        return str(value)

    def section(self, value: object, where: str, known: set[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(where, f"expected an object, got {_type_name(value)}")
            return {}
        for key in value:
            if key not in known:
                self.fail(f"{where}.{key}", f"unknown field (known: {', '.join(sorted(known))})")
        return value

    def items(self, value: object, where: str, max_items: int) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(where, f"expected a list, got {_type_name(value)}")
            return []
        if len(value) > max_items:
            self.fail(where, f"has {len(value)} items; the limit is {max_items}")
            return []
        return value

    # -- sections ---------------------------------------------------------------------

    def tools(self, value: object) -> tuple[Tool, ...]:
        out = []
        for i, item in enumerate(self.items(value, "tools", MAX_TOOLS)):
            where = f"tools[{i}]"
            obj = self.section(item, where, {"name", "signature", "description"})
            name = self.string(obj, "name", f"{where}.name", 128, required=bool(obj))
            if name is not None and not name.isidentifier():
                self.fail(f"{where}.name", f"must be a Python identifier, got {name!r}")
            out.append(
                Tool(
                    name=name or "",
                    signature=self.string(obj, "signature", f"{where}.signature", 2000) or "",
                    description=self.string(obj, "description", f"{where}.description") or "",
                )
            )
        return tuple(out)

    def files(self, value: object) -> tuple[FileSpec, ...]:
        out = []
        total = 0
        for i, item in enumerate(self.items(value, "files", MAX_FILES)):
            where = f"files[{i}]"
            obj = self.section(item, where, {"path", "content_b64"})
            path = self.string(obj, "path", f"{where}.path", 512, required=True)
            if path is not None and not _safe_relative_path(path):
                self.fail(f"{where}.path", "must be a relative path inside the work dir, no '..'")
            content = self.string(obj, "content_b64", f"{where}.content_b64", 2 * MAX_FILES_BYTES)
            if content is None:
                if "content_b64" not in obj:
                    self.fail(f"{where}.content_b64", "is required")
                continue
            try:
                total += len(base64.b64decode(content, validate=True))
            except (binascii.Error, ValueError):
                self.fail(f"{where}.content_b64", "is not valid base64")
                continue
            out.append(FileSpec(path=path or "", content_b64=content))
        if total > MAX_FILES_BYTES:
            self.fail("files", f"hold {total} bytes; the limit is {MAX_FILES_BYTES}")
        return tuple(out)

    def limits(self, value: object) -> Limits:
        known = set(Limits.__dataclass_fields__)
        obj = self.section(value, "limits", known)
        d = Limits()
        max_tokens = obj.get("max_tokens")
        return Limits(
            max_turns=self.number(obj, "max_turns", "limits.max_turns", d.max_turns, 1, 200, True),
            timeout_s=self.number(obj, "timeout_s", "limits.timeout_s", d.timeout_s, 1, 86_400),
            exec_timeout_s=self.number(
                obj, "exec_timeout_s", "limits.exec_timeout_s", d.exec_timeout_s, 0.1, 3600
            ),
            max_output_chars=self.number(
                obj,
                "max_output_chars",
                "limits.max_output_chars",
                d.max_output_chars,
                100,
                1_000_000,
                True,
            ),
            max_tokens=None
            if max_tokens is None
            else self.number(obj, "max_tokens", "limits.max_tokens", None, 1, 10**9, True),
        )

    def sandbox(self, value: object) -> SandboxSpec:
        obj = self.section(value, "sandbox", set(SandboxSpec.__dataclass_fields__))
        d = SandboxSpec()
        image = self.string(obj, "image", "sandbox.image", 256)
        if image is not None and not re.match(r"^[a-z0-9][a-z0-9._/:@-]*$", image):
            self.fail("sandbox.image", f"is not a valid image reference: {image!r}")
        return SandboxSpec(
            image=image,
            network=self.boolean(obj, "network", "sandbox.network", d.network),
            memory_mb=self.number(
                obj, "memory_mb", "sandbox.memory_mb", d.memory_mb, 64, 65_536, True
            ),
            cpus=self.number(obj, "cpus", "sandbox.cpus", d.cpus, 0.1, 64),
        )

    def llm(self, value: object) -> LLMParams:
        obj = self.section(value, "llm", set(LLMParams.__dataclass_fields__))
        d = LLMParams()
        seed = obj.get("seed")
        return LLMParams(
            temperature=self.number(obj, "temperature", "llm.temperature", d.temperature, 0, 2),
            max_tokens_per_turn=self.number(
                obj,
                "max_tokens_per_turn",
                "llm.max_tokens_per_turn",
                d.max_tokens_per_turn,
                1,
                1_000_000,
                True,
            ),
            seed=None
            if seed is None
            else self.number(obj, "seed", "llm.seed", None, 0, 2**63, True),
        )

    def expected(self, value: object) -> Expected | None:
        if value is None:
            return None
        obj = self.section(value, "expected", {"answer", "grader", "tolerance"})
        if obj and "answer" not in obj:
            self.fail("expected.answer", "is required when expected is given")
        grader = self.choice(obj, "grader", GRADERS, "exact") if obj else "exact"
        tolerance = obj.get("tolerance")
        if tolerance is not None:
            tolerance = self.number(obj, "tolerance", "expected.tolerance", None, 0, 1e300)
        answer = obj.get("answer")
        if grader == "regex" and isinstance(answer, str):
            try:
                re.compile(answer)
            except re.error as e:
                self.fail("expected.answer", f"is not a valid regular expression: {e}")
        return Expected(answer=answer, grader=grader, tolerance=tolerance)

    def webhook(self, value: object) -> Webhook | None:
        if value is None:
            return None
        obj = self.section(value, "webhook", {"url"})
        url = self.string(obj, "url", "webhook.url", MAX_URL_CHARS, required=True)
        if url is not None:
            try:
                parse_url(url)  # the syntax; where it may point is the server's policy
            except DestinationError as e:
                self.fail("webhook.url", e.reason)
        return Webhook(url=url or "")

    def metadata(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail("metadata", f"expected an object of strings, got {_type_name(value)}")
            return {}
        if len(value) > MAX_METADATA_ITEMS:
            self.fail("metadata", f"has {len(value)} keys; the limit is {MAX_METADATA_ITEMS}")
        out = {}
        for k, v in value.items():
            if not isinstance(v, str) or len(str(k)) > 128 or len(v) > 1024:
                self.fail(f"metadata.{k}", "values must be strings of at most 1024 characters")
            else:
                out[str(k)] = v
        return out


def _safe_relative_path(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts and "" not in parts


def _type_name(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for t, name in names.items():
        if isinstance(value, t):
            return name
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
