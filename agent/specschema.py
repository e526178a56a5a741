"""The task spec's fields and their bounds: the one table that ``TaskSpec.from_dict`` checks
input with and that the API's JSON Schema is generated from, so the two cannot drift.

A field has a kind::

    Text     a string: a length bound, an optional pattern the whole string must match
    Number   a number (or an integer) within bounds
    Flag     true or false
    OneOf    one of a few strings
    AnyJSON  any JSON value
    Section  an object of named fields (named, so that a schema can refer to it)
    ListOf   a list of one kind
    MapOf    an object of string keys to strings

``Checker`` reads raw input against a kind and collects ``"where: what to fix"`` problems;
``json_schema`` renders the same kinds as JSON Schema (the dialect of OpenAPI 3.1). An
optional field also takes ``null``, meaning "the default". Patterns are written in the
syntax Python, ECMA-262 and RE2 read alike (explicit ASCII classes: ``\\d``, ``\\w`` and
``\\s`` differ between them) and match the whole string: the checker uses ``fullmatch``
(Python's ``$`` also matches before a final newline), the schema anchors ``^(?:...)$``.

A server narrows fields to what it grants (``narrow``: its caps on memory and CPUs, its one
image, no network), and the narrowed table checks and documents the same rules. What a
table cannot say (a file path that is also a directory, the total size of the files) is
checked in ``agent.models``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.destinations import MAX_URL_CHARS
from agent.text import encodable, printable

MAX_DEPTH = 32  # of nested lists and objects in a whole spec (expected.answer is free-form)
WHITESPACE = " \t\n\r\f\v"
_NOT_BLANK = "[^ \\t\\n\\r\\f\\v]"  # one character other than ASCII whitespace


@dataclass(frozen=True, slots=True)
class Text:
    max_len: int = 10_000
    pattern: str | None = None  # the whole string must match it
    hint: str = ""  # what to fix when it does not
    nonblank: bool = False  # must hold a character other than ASCII whitespace


@dataclass(frozen=True, slots=True)
class Number:
    lo: float
    hi: float
    integer: bool = False
    cap: str = ""  # who set ``hi``, when a server narrowed it


@dataclass(frozen=True, slots=True)
class Flag:
    only: bool | None = None  # the one value a server grants
    refusal: str = ""  # what to fix when a request asks for the other


@dataclass(frozen=True, slots=True)
class OneOf:
    options: tuple[str, ...]
    refusal: str = ""  # what to fix when the value is not an option (default: list them)


@dataclass(frozen=True, slots=True)
class AnyJSON:
    pass


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Kind
    max_items: int


@dataclass(frozen=True, slots=True)
class MapOf:
    key: Text
    value: Text
    max_items: int


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    default: Any = None  # documented in the schema; the dataclasses in agent.models apply it
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Section:
    name: str  # the schema's name for it
    fields: tuple[Field, ...]
    description: str = ""
    schema_extra: Mapping[str, Any] = field(default_factory=dict)  # rules the checker adds

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


Kind = Text | Number | Flag | OneOf | AnyJSON | Section | ListOf | MapOf

_NAMES: dict[int, tuple[Section, tuple[str, ...]]] = {}


def _names(section: Section) -> tuple[str, ...]:
    """``section.names``, computed once per section (the checker asks for every object)."""
    found = _NAMES.get(id(section))
    if found is None or found[0] is not section:
        found = _NAMES[id(section)] = (section, section.names)
    return found[1]


class Invalid:
    """The value ``Checker.check`` returns for input it refused."""

    def __repr__(self) -> str:
        return "INVALID"


INVALID = Invalid()


# -- the table ----------------------------------------------------------------------------

GRADERS = ("exact", "numeric", "contains", "regex", "python_literal")
ACTION_FORMATS = ("code", "json", "text")
MAX_PROMPT_CHARS = 200_000
MAX_SETUP_CODE_CHARS = 200_000
MAX_FILES = 64
MAX_FILES_BYTES = 8 * 1024 * 1024
MAX_TOOLS = 64
MAX_METADATA_ITEMS = 32

CUSTOM_ID = "[A-Za-z0-9._:/@+=-]{1,128}"
IMAGE = "[a-z0-9][a-z0-9._/:@-]{0,255}"
IDENTIFIER = "[A-Za-z_][A-Za-z0-9_]{0,127}"
# A path segment: printable ASCII except '/' and '\' (so a segment's characters are its
# bytes), not '.' or '..', at most 255 long (the file system's limit).
_C = "[\\x20-\\x2e\\x30-\\x5b\\x5d-\\x7e]"  # a segment's character
_N = "[\\x20-\\x2d\\x30-\\x5b\\x5d-\\x7e]"  # ... other than '.'
_SEGMENT = f"(?:{_N}{_C}{{0,254}}|\\.{_N}{_C}{{0,253}}|\\.\\.{_C}{{1,253}})"
MAX_PATH_SEGMENTS = 16
PATH = f"{_SEGMENT}(?:/{_SEGMENT}){{0,{MAX_PATH_SEGMENTS - 1}}}"
BASE64 = "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"

TOOL = Section(
    "Tool",
    (
        Field("name", Text(128, IDENTIFIER, "must be a Python identifier"), required=True),
        Field("signature", Text(2000), "", description="e.g. `fib(n: int) -> int`"),
        Field("description", Text(10_000), ""),
    ),
    "A function that setup_code defines, documented to the model.",
)
FILE = Section(
    "File",
    (
        Field(
            "path",
            Text(
                512,
                PATH,
                "must be a relative path inside the work dir: segments of printable ASCII "
                f"separated by '/', none empty, '.' or '..', at most {MAX_PATH_SEGMENTS} "
                "segments of 255 characters, no '\\'",
            ),
            required=True,
            description="relative path inside the sandbox work dir",
        ),
        Field(
            "content_b64",
            Text(2 * MAX_FILES_BYTES, BASE64, "is not valid base64 (padded, no line breaks)"),
            required=True,
        ),
    ),
    f"A file written into the work dir before setup_code runs; all files together hold at "
    f"most {MAX_FILES_BYTES} bytes, and a later file of the same path replaces an earlier one.",
)
LIMITS = Section(
    "Limits",
    (
        Field("max_turns", Number(1, 200, integer=True), 10),
        Field("timeout_s", Number(1, 86_400), 900.0, description="wall clock, across retries"),
        Field("exec_timeout_s", Number(0.1, 3600), 30.0),
        Field("max_output_chars", Number(100, 1_000_000, integer=True), 2000),
        Field("max_tokens", Number(1, 10**9, integer=True), description="for the whole task"),
    ),
)
SANDBOX = Section(
    "SandboxSpec",
    (
        Field("image", Text(256, IMAGE, "is not a valid image reference")),
        Field("network", Flag(), False),
        Field("memory_mb", Number(64, 65_536, integer=True), 512),
        Field("cpus", Number(0.1, 64), 1.0),
    ),
)
LLM = Section(
    "LLMParams",
    (
        Field("temperature", Number(0, 2), 0.0),
        Field("max_tokens_per_turn", Number(1, 1_000_000, integer=True), 1024),
        Field("seed", Number(0, 2**63 - 1, integer=True)),
    ),
)
EXPECTED = Section(
    "Expected",
    (
        Field("answer", AnyJSON(), required=True),
        Field("grader", OneOf(GRADERS), "exact"),
        Field("tolerance", Number(0, 1e300), description="absolute, for numeric graders"),
    ),
    "What a correct answer is. A `regex` answer is an RE2 pattern searched for in the answer.",
    # The checker refuses a regex grader with an answer that is not a string (agent.models).
    schema_extra={
        "if": {"properties": {"grader": {"const": "regex"}}, "required": ["grader"]},
        "then": {"properties": {"answer": {"type": "string", "format": "regex"}}},
    },
)
WEBHOOK = Section(
    "Webhook",
    (Field("url", Text(MAX_URL_CHARS), required=True),),
    "Where `task.finished` is POSTed (signed); its host must be public or allowlisted.",
)
TASK_SPEC = Section(
    "TaskSpec",
    (
        Field("prompt", Text(MAX_PROMPT_CHARS, nonblank=True), required=True),
        Field(
            "custom_id",
            Text(128, CUSTOM_ID, "use 1-128 characters from letters, digits and ._:/@+=-"),
            description="your id; unique within a batch",
        ),
        Field("model", Text(256)),
        Field("system_prompt", Text(MAX_PROMPT_CHARS)),
        Field(
            "setup_code",
            Text(MAX_SETUP_CODE_CHARS),
            description="Python run in the sandbox before turn 1",
        ),
        Field("tools", ListOf(TOOL, MAX_TOOLS), []),
        Field("files", ListOf(FILE, MAX_FILES), []),
        Field("limits", LIMITS),
        Field("sandbox", SANDBOX),
        Field("llm", LLM),
        Field("expected", EXPECTED),
        Field("action_format", OneOf(ACTION_FORMATS), "code"),
        Field("webhook", WEBHOOK),
        Field("metadata", MapOf(Text(128), Text(1024), MAX_METADATA_ITEMS), {}),
    ),
    "A task for a CodeAct agent (one line of a batch file).",
)


def narrow(root: Section, changes: Mapping[str, Kind]) -> Section:
    """``root`` with the kinds at the dotted paths in ``changes`` replaced."""
    fields = []
    for f in root.fields:
        if f.name in changes:
            f = replace(f, kind=changes[f.name])
        nested = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith(f.name + ".")}
        if nested:
            assert isinstance(f.kind, Section), f"{f.name} has no fields"
            f = replace(f, kind=narrow(f.kind, nested))
        fields.append(f)
    return replace(root, fields=tuple(fields))


def find(root: Section, path: str) -> Field:
    """The field at a dotted path (``"sandbox.memory_mb"``)."""
    head, _, rest = path.partition(".")
    f = root.field(head)
    if not rest:
        return f
    assert isinstance(f.kind, Section), f"{head} has no fields"
    return find(f.kind, rest)


# -- checking -----------------------------------------------------------------------------


class Checker:
    """Checks raw values against kinds, collecting every problem instead of stopping."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, where: str, what: str) -> None:
        # A problem may quote the input, which may not be encodable (a lone surrogate):
        # the message must be, or the error response itself would fail.
        self.problems.append(printable(f"{where or 'task'}: {what}"))

    def fields(self, section: Section, raw: object, where: str) -> tuple[dict[str, Any], bool]:
        """The present, valid fields of an object (``null`` counts as absent), and whether
        the object is complete: an object with every required field valid."""
        if not isinstance(raw, Mapping):
            self.fail(where, f"expected an object, got {type_name(raw)}")
            return {}, False
        known = _names(section)
        for key in raw:
            if key not in known:
                self.fail(_join(where, str(key)), f"unknown field (known: {', '.join(known)})")
        out: dict[str, Any] = {}
        complete = True
        for f in section.fields:
            present = f.name in raw if isinstance(f.kind, AnyJSON) else raw.get(f.name) is not None
            if not present:
                if f.required:
                    self.fail(_join(where, f.name), "is required")
                    complete = False
                continue
            value = self.check(f.kind, raw[f.name], _join(where, f.name))
            if value is INVALID:
                complete = complete and not f.required
            else:
                out[f.name] = value
        return out, complete

    def check(self, kind: Kind, value: object, where: str) -> Any:
        """The checked value (ints for integers, floats for numbers), or INVALID. A list
        keeps its invalid items as INVALID, so that they keep their positions."""
        if isinstance(kind, Section):
            out, complete = self.fields(kind, value, where)
            return out if complete else INVALID
        if isinstance(kind, Text):
            return self._text(kind, value, where)
        if isinstance(kind, Number):
            return self._number(kind, value, where)
        if isinstance(kind, Flag):
            if not isinstance(value, bool):
                self.fail(where, f"expected true or false, got {type_name(value)}")
                return INVALID
            if kind.only is not None and value is not kind.only:
                self.fail(where, kind.refusal or f"must be {str(kind.only).lower()}")
                return INVALID
            return value
        if isinstance(kind, OneOf):
            if not isinstance(value, str) or value not in kind.options:
                shown = repr(value) if isinstance(value, str) else type_name(value)
                self.fail(
                    where,
                    f"{kind.refusal or 'must be one of ' + ', '.join(kind.options)}, got {shown}",
                )
                return INVALID
            return value
        if isinstance(kind, ListOf):
            return self._list(kind, value, where)
        if isinstance(kind, MapOf):
            return self._map(kind, value, where)
        return value  # AnyJSON

    def _text(self, kind: Text, value: object, where: str) -> str | Invalid:
        if not isinstance(value, str):
            self.fail(where, f"expected a string, got {type_name(value)}")
            return INVALID
        if len(value) > kind.max_len:
            self.fail(where, f"is {len(value)} characters; the limit is {kind.max_len}")
            return INVALID
        if kind.nonblank and not value.strip(WHITESPACE):
            self.fail(where, "must not be blank")
            return INVALID
        if kind.pattern is not None and _compiled(kind.pattern).fullmatch(value) is None:
            self.fail(
                where, f"{kind.hint or 'does not match ' + kind.pattern}, got {_shown(value)}"
            )
            return INVALID
        return value

    def _number(self, kind: Number, value: object, where: str) -> int | float | Invalid:
        wanted = "an integer" if kind.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(where, f"expected {wanted}, got {type_name(value)}")
            return INVALID
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(where, f"expected {wanted}, got {value}")
            return INVALID
        if kind.integer and isinstance(value, float) and not value.is_integer():
            self.fail(where, f"expected an integer, got {value}")
            return INVALID
        if value > kind.hi and kind.cap:
            self.fail(where, f"must be at most {_num(kind.hi)} ({kind.cap}), got {_num(value)}")
            return INVALID
        if not kind.lo <= value <= kind.hi:
            self.fail(
                where, f"must be between {_num(kind.lo)} and {_num(kind.hi)}, got {_num(value)}"
            )
            return INVALID
        return int(value) if kind.integer else float(value)

    def _list(self, kind: ListOf, value: object, where: str) -> list[Any] | Invalid:
        if not isinstance(value, list):
            self.fail(where, f"expected a list, got {type_name(value)}")
            return INVALID
        if len(value) > kind.max_items:
            self.fail(where, f"has {len(value)} items; the limit is {kind.max_items}")
            return INVALID
        return [self.check(kind.item, v, f"{where}[{i}]") for i, v in enumerate(value)]

    def _map(self, kind: MapOf, value: object, where: str) -> dict[str, str] | Invalid:
        if not isinstance(value, Mapping):
            self.fail(where, f"expected an object of strings, got {type_name(value)}")
            return INVALID
        if len(value) > kind.max_items:
            self.fail(where, f"has {len(value)} keys; the limit is {kind.max_items}")
            return INVALID
        out: dict[str, str] = {}
        for k, v in value.items():
            at = _join(where, str(k))
            if len(str(k)) > kind.key.max_len:
                self.fail(at, f"keys may have at most {kind.key.max_len} characters")
                continue
            checked = self._text(kind.value, v, at)
            if isinstance(checked, str):
                out[str(k)] = checked
        return out


def problems_anywhere(raw: object, limit: int = 10) -> list[str]:
    """What no field of a spec may hold: text that cannot be encoded as UTF-8 (a lone
    surrogate, which JSON's ``\\udfff`` escape can carry), and nesting deeper than
    ``MAX_DEPTH``. Walks keys and values alike, without recursion."""
    if _clean(raw, 0):
        return []  # the common case, without building a path for every value
    found: list[str] = []
    for where, item, depth in _walk(raw):
        if depth > MAX_DEPTH:
            found.append(f"{where or 'task'}: is nested deeper than {MAX_DEPTH} levels; flatten it")
        elif isinstance(item, str) and not encodable(item):
            at = next(i for i, ch in enumerate(item) if not encodable(ch))
            found.append(
                printable(
                    f"{where or 'task'}: is not valid Unicode text (a lone surrogate "
                    f"{item[at]!a} at character {at}): send UTF-8 text"
                )
            )
        if len(found) >= limit:
            break
    return found


def _clean(item: object, depth: int) -> bool:
    """What ``problems_anywhere`` finds nothing in: no unencodable text, nothing deeper
    than ``MAX_DEPTH``. Recurses at most ``MAX_DEPTH + 1`` deep."""
    if depth > MAX_DEPTH:
        return False
    if isinstance(item, str):
        return encodable(item)
    if isinstance(item, Mapping):
        for k, v in item.items():
            if isinstance(k, str) and not encodable(k):
                return False
            if not _clean(v, depth + 1):
                return False
        return True
    if isinstance(item, list):
        return all(_clean(v, depth + 1) for v in item)
    return True


def _walk(raw: object) -> Iterator[tuple[str, object, int]]:
    """(path, value, depth) of every value and key, depth first, stopping below
    MAX_DEPTH + 1 (one report per over-deep branch)."""
    stack: list[tuple[str, object, int]] = [("", raw, 0)]
    while stack:
        where, item, depth = stack.pop()
        yield where, item, depth
        if depth > MAX_DEPTH:
            continue
        if isinstance(item, Mapping):
            for k, v in reversed(list(item.items())):
                at = _join(where, str(k))
                if isinstance(k, str) and not encodable(k):
                    yield at, k, depth + 1
                stack.append((at, v, depth + 1))
        elif isinstance(item, list):
            stack.extend(
                (f"{where}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(item)))
            )


def type_name(value: object) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    for t, name in names.items():
        if isinstance(value, t):
            return name
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _num(x: float) -> str:
    if isinstance(x, int):
        s = str(x)
        return s if len(s) <= 24 else f"{s[:12]}... ({len(s)} digits)"
    return str(int(x)) if x.is_integer() and abs(x) < 1e18 else f"{x:g}"


def _shown(value: str, limit: int = 80) -> str:
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


_patterns: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    found = _patterns.get(pattern)
    if found is None:
        found = _patterns[pattern] = re.compile(pattern)
    return found


# -- JSON Schema --------------------------------------------------------------------------


def json_schema(root: Section, ref: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Every section reachable from ``root``, by name, as a JSON Schema object; a section
    refers to another as ``{"$ref": ref(name)}``."""
    out: dict[str, dict[str, Any]] = {}
    todo = [root]
    while todo:
        section = todo.pop()
        if section.name in out:
            continue
        props = {}
        for f in section.fields:
            schema = _schema(f.kind, ref, todo)
            if not f.required:
                schema = {"anyOf": [schema, {"type": "null"}]}
            if f.default is not None:
                schema["default"] = f.default
            if f.description:
                schema["description"] = f.description
            props[f.name] = schema
        obj: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
            **section.schema_extra,
        }
        required = [f.name for f in section.fields if f.required]
        if required:
            obj["required"] = required
        if section.description:
            obj["description"] = section.description
        out[section.name] = obj
    return out


def _schema(kind: Kind, ref: Callable[[str], str], todo: list[Section]) -> dict[str, Any]:
    if isinstance(kind, Section):
        todo.append(kind)
        return {"$ref": ref(kind.name)}
    if isinstance(kind, Text):
        out: dict[str, Any] = {"type": "string", "maxLength": kind.max_len}
        patterns = [f"^(?:{kind.pattern})$"] if kind.pattern else []
        if kind.nonblank:
            patterns.append(_NOT_BLANK)
        if len(patterns) == 1:
            out["pattern"] = patterns[0]
        elif patterns:
            out["allOf"] = [{"pattern": p} for p in patterns]
        return out
    if isinstance(kind, Number):
        lo, hi = kind.lo, kind.hi
        if kind.integer:
            return {"type": "integer", "minimum": int(lo), "maximum": int(hi)}
        return {"type": "number", "minimum": lo, "maximum": hi}
    if isinstance(kind, Flag):
        return (
            {"type": "boolean"} if kind.only is None else {"type": "boolean", "enum": [kind.only]}
        )
    if isinstance(kind, OneOf):
        return {"type": "string", "enum": list(kind.options)}
    if isinstance(kind, ListOf):
        return {"type": "array", "items": _schema(kind.item, ref, todo), "maxItems": kind.max_items}
    if isinstance(kind, MapOf):
        return {
            "type": "object",
            "propertyNames": {"maxLength": kind.key.max_len},
            "additionalProperties": _schema(kind.value, ref, todo),
            "maxProperties": kind.max_items,
        }
    return {}  # AnyJSON
