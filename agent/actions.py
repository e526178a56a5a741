"""Parsing a model's reply into an action: code to run, an answer, or neither.

Tolerates what real servers send: a reply cut at a stop sequence without its closing
delimiter, several code blocks (run in order, as one cell), markdown fences inside or
instead of the tags, prose only, and a solution next to code.

Three action formats (the paper's comparison): ``code`` (``<execute>`` blocks), ``json``
(``{"tool": name, "arguments": {...}}`` or ``{"answer": ...}``) and ``text``
(``Action: tool_name, arg, ... End Action`` or ``Answer: ...``). The last two are turned
into a single call of a known tool with literal arguments, so every format runs through the
same sandbox and the same Python functions.

Every format stops the model before it writes an observation of its own (``STOPS``); a
server that ignores stop sequences is caught up with by ``cut_at_stop``.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EXECUTE_OPEN, EXECUTE_CLOSE = "<execute>", "</execute>"
END_ACTION = "End Action"
OBSERVATION = "Observation:"

# Where a reply must end. "\nObservation:" is what a model writes when it goes on to invent
# the result of its own action; OpenAI-compatible servers accept at most four sequences.
STOPS: Mapping[str, tuple[str, ...]] = {
    "code": (EXECUTE_CLOSE, "\n" + OBSERVATION),
    "json": (OBSERVATION,),
    "text": (END_ACTION, OBSERVATION),
}
STOP_SEQUENCES = STOPS["code"]

_EXECUTE = re.compile(r"<execute>(.*?)(?:</execute>|\Z)", re.DOTALL)
_SOLUTION = re.compile(r"<solution>(.*?)(?:</solution>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.DOTALL)
_ANY_FENCE = re.compile(r"\A```[^\n`]*\n(.*?)\n?```\Z", re.DOTALL)
# "Action:" at the start of a line (markdown emphasis allowed), up to "End Action" or the
# line's end; ReAct-style models put the arguments on an "Action Input:" line below it.
_TEXT_ACTION = re.compile(
    r"^[ \t>*#]*Action:\**[ \t]*(.*?)[ \t]*(?:End Action|$)"
    r"(?:\n[ \t>*#]*Action Input:\**[ \t]*(?P<input>.*?)[ \t]*(?:End Action|$))?",
    re.MULTILINE,
)
_TEXT_ANSWER = re.compile(r"^[ \t>*#]*(?:Final )?Answer:\**[ \t]*(.*)$", re.MULTILINE)
_CALL_FORM = re.compile(r"([A-Za-z_]\w*)\s*\((.*)\)\s*\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Action:
    """What a reply asks for. ``code`` and ``answer`` may both be set (see ``parse``);
    ``problem`` explains, for the model, why a reply that tried to act could not be used."""

    code: str | None = None
    answer: str | None = None
    problem: str | None = None

    @property
    def kind(self) -> str:
        if self.code is not None:
            return "code"
        return "answer" if self.answer is not None else "none"


def stop_sequences(action_format: str) -> tuple[str, ...]:
    return STOPS.get(action_format, STOP_SEQUENCES)


def cut_at_stop(reply: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """Cut ``reply`` before the first of ``stops``, as a server that honours them would.

    Returns the kept text and the dropped rest (empty when nothing was cut), so a server
    that ignores stop sequences gives the loop the same reply as one that does not.
    """
    cuts = [i for s in stops if s and (i := reply.find(s)) >= 0]
    if not cuts:
        return reply, ""
    at = min(cuts)
    return reply[:at], reply[at:]


def parse(
    reply: str, action_format: str = "code", tool_names: frozenset[str] = frozenset()
) -> Action:
    if action_format == "json":
        return _parse_json(reply, tool_names)
    if action_format == "text":
        return _parse_text(reply, tool_names)
    return _parse_code(reply)


def complete_transcript(reply: str, action_format: str = "code") -> str:
    """The reply as it belongs in the transcript: an action cut at its stop sequence gets
    its closing delimiter back (``</execute>``, ``End Action``), so the next turn's prompt
    shows the model well-formed actions to follow."""
    if action_format == "text":
        calls = list(_TEXT_ACTION.finditer(reply))
        if calls and END_ACTION not in reply[calls[-1].start() :]:
            return reply.rstrip() + " " + END_ACTION
        return reply
    if action_format == "code" and reply.rfind(EXECUTE_OPEN) > reply.rfind(EXECUTE_CLOSE):
        return reply.rstrip() + "\n" + EXECUTE_CLOSE
    return reply


def unfence(answer: str) -> str:
    """An answer without the markdown a model wrapped it in: a fenced block (with or
    without a language tag) or one pair of inline backticks."""
    text = answer.strip()
    m = _ANY_FENCE.match(text)
    if m:
        return m.group(1).strip()
    if len(text) >= 2 and text[0] == text[-1] == "`" and "`" not in text[1:-1]:
        return text[1:-1].strip()
    return text


# -- code -------------------------------------------------------------------------------


def _parse_code(reply: str) -> Action:
    blocks = [_strip_fence(b) for b in _EXECUTE.findall(reply)]
    blocks = [b for b in blocks if b.strip()]
    answer = _solution(reply)
    if not blocks and answer is None:
        # Fenced code with no tags: models often do this; running it is what they meant.
        fenced = [b for b in _FENCE.findall(reply) if b.strip()]
        if fenced:
            blocks = fenced
    code = "\n\n".join(_dedent(b) for b in blocks) if blocks else None
    return Action(code=code, answer=answer)


# -- json -------------------------------------------------------------------------------


def _parse_json(reply: str, tool_names: frozenset[str]) -> Action:
    obj = _first_json_object(reply)
    if obj is None:
        return Action(answer=_answer_line(reply))
    if "answer" in obj:
        answer = obj["answer"]
        return Action(answer=unfence(answer) if isinstance(answer, str) else json.dumps(answer))
    # {"tool": ..., "arguments": {...}} as documented; {"name": ..., "arguments": ...} is
    # what models trained on function calling write, sometimes with the arguments as a
    # JSON string; "args" may be a list of positional arguments.
    tool = obj.get("tool", obj.get("name"))
    args: Any = next((obj[k] for k in ("arguments", "args", "parameters") if k in obj), {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = [args]
    if not isinstance(tool, str) or not isinstance(args, dict | list):
        return Action(problem='a tool call is {"tool": "<name>", "arguments": {...}}')
    problem = _unknown_tool(tool, tool_names)
    if problem is not None:
        return Action(problem=problem)
    if isinstance(args, list):
        return Action(code=_call(tool, args, {}))
    return Action(code=_call(tool, [], args))


# -- text -------------------------------------------------------------------------------


def _parse_text(reply: str, tool_names: frozenset[str]) -> Action:
    m = _TEXT_ACTION.search(reply)
    if m:
        call = m.group(1).strip().strip("`").strip()
        given = m.group("input")
        if given is not None and given.strip():
            call = f"{call}, {given.strip()}"
        return _text_call(call, tool_names)
    return Action(answer=_answer_line(reply))


def _text_call(call: str, tool_names: frozenset[str]) -> Action:
    """``tool_name, arg, ...`` (the documented form) or ``tool_name(arg, ...)``."""
    as_call = _CALL_FORM.match(call)
    if as_call:
        name = as_call.group(1)
        parsed = _literal_call(call)
        if parsed is None:
            return Action(
                problem=f"could not read the action {call!r}: the arguments must be plain "
                "values; write Action: tool_name, argument_1, argument_2 End Action"
            )
    else:
        name, _, rest = call.partition(",")
        name = name.strip()
        if not name.isidentifier():
            return Action(
                problem=f"could not read the action {call!r}: it must start with a tool "
                "name, as in Action: tool_name, argument_1 End Action"
            )
        given = _json_object(rest)
        if given is not None:  # "Action Input: {...}", the ReAct way
            parsed = ([], given)
        elif not rest.strip():
            parsed = ([], {})
        else:
            # Bare words, as in "Action: search, New York", are text.
            parsed = _literal_call(f"f({rest})") or (
                [_literal_or_text(p) for p in rest.split(",")],
                {},
            )
    problem = _unknown_tool(name, tool_names)
    return Action(problem=problem) if problem else Action(code=_call(name, *parsed))


def _json_object(text: str) -> dict[str, Any] | None:
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _literal_call(call: str) -> tuple[list[Any], dict[str, Any]] | None:
    """The arguments of ``f(...)`` if every one is a Python literal, else ``None``."""
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if any(k.arg is None for k in node.keywords):
        return None
    return args, kwargs


def _literal_or_text(piece: str) -> Any:
    piece = piece.strip()
    try:
        return ast.literal_eval(piece)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return piece


# -- shared -----------------------------------------------------------------------------


def _call(tool: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Python source calling ``tool``; ``repr`` of decoded JSON or literals is a literal."""
    parts = [repr(a) for a in args]
    if all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        parts += [f"{k}={v!r}" for k, v in kwargs.items()]
    elif kwargs:
        parts.append(f"**{kwargs!r}")
    return f"{tool}({', '.join(parts)})"


def _unknown_tool(tool: str, tool_names: frozenset[str]) -> str | None:
    if tool in tool_names:
        return None
    if not tool_names:
        return f"unknown tool {tool!r}: this task has no tools; give your answer instead"
    return f"unknown tool {tool!r}; the tools are: {', '.join(sorted(tool_names))}"


def _answer_line(reply: str) -> str | None:
    """An answer given as ``Answer: ...`` (the rest of that line, or what follows it when
    the line is empty) or as ``<solution>...</solution>``."""
    m = _TEXT_ANSWER.search(reply)
    if m:
        answer = m.group(1).strip() or reply[m.end() :].strip()
        if answer:
            return unfence(answer)
    return _solution(reply)


def _solution(reply: str) -> str | None:
    found = _SOLUTION.findall(reply)
    return unfence(found[-1]) if found else None


def _strip_fence(block: str) -> str:
    m = _FENCE.match(block.strip())
    return m.group(1) if m else block


def _dedent(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def _first_json_object(reply: str) -> dict[str, Any] | None:
    candidates = [*_JSON_FENCE.findall(reply), reply]
    decoder = json.JSONDecoder()
    for text in candidates:
        start = text.find("{")
        while start != -1:
            try:
                obj, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                start = text.find("{", start + 1)
                continue
            if isinstance(obj, dict):
                return obj
            start = text.find("{", start + 1)
    return None
