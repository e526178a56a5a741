"""Parsing a model's reply into an action: code to run, an answer, or neither.

Tolerates what real servers send: a reply cut at the ``</execute>`` stop sequence without
its closing tag, several code blocks (run in order, as one cell), markdown fences inside
or instead of the tags, prose only, and a solution next to code.

Three action formats (the paper's comparison): ``code`` (``<execute>`` blocks), ``json``
(``{"tool": name, "arguments": {...}}`` or ``{"answer": ...}``) and ``text``
(``Action: tool(args)`` or ``Answer: ...``). The last two are turned into code, so every
format runs through the same sandbox.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from dataclasses import dataclass

EXECUTE_OPEN, EXECUTE_CLOSE = "<execute>", "</execute>"
STOP_SEQUENCES = (EXECUTE_CLOSE,)

_EXECUTE = re.compile(r"<execute>(.*?)(?:</execute>|\Z)", re.DOTALL)
_SOLUTION = re.compile(r"<solution>(.*?)(?:</solution>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.DOTALL)
_TEXT_ACTION = re.compile(r"^\s*Action:\s*(.+?)\s*$", re.MULTILINE)
_TEXT_ANSWER = re.compile(r"^\s*(?:Answer|Final Answer):\s*(.+?)\s*\Z", re.MULTILINE | re.DOTALL)


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


def parse(
    reply: str, action_format: str = "code", tool_names: frozenset[str] = frozenset()
) -> Action:
    if action_format == "json":
        return _parse_json(reply, tool_names)
    if action_format == "text":
        return _parse_text(reply, tool_names)
    return _parse_code(reply)


def complete_transcript(reply: str) -> str:
    """The reply as it belongs in the transcript: an ``<execute>`` block cut at the stop
    sequence gets its closing tag back, so the next turn's prompt stays well formed."""
    if reply.rfind(EXECUTE_OPEN) > reply.rfind(EXECUTE_CLOSE):
        return reply.rstrip() + "\n" + EXECUTE_CLOSE
    return reply


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


def _parse_json(reply: str, tool_names: frozenset[str]) -> Action:
    obj = _first_json_object(reply)
    if obj is None:
        return Action(answer=_solution(reply))
    if "answer" in obj:
        answer = obj["answer"]
        return Action(answer=answer if isinstance(answer, str) else json.dumps(answer))
    tool, args = obj.get("tool"), obj.get("arguments", obj.get("args", {}))
    if not isinstance(tool, str) or not isinstance(args, dict):
        return Action(problem='a JSON action needs {"tool": "<name>", "arguments": {...}}')
    if tool not in tool_names:
        return Action(
            problem=f"unknown tool {tool!r}; the tools are: {', '.join(sorted(tool_names))}"
        )
    # repr() of JSON-decoded data is a valid Python literal.
    return Action(code=f"{tool}(**{args!r})")


def _parse_text(reply: str, tool_names: frozenset[str]) -> Action:
    m = _TEXT_ACTION.search(reply)
    if m:
        call = m.group(1).strip().strip("`")
        try:
            node = ast.parse(call, mode="eval").body
        except SyntaxError:
            return Action(problem=f"could not read the action {call!r}: write tool_name(arguments)")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            return Action(problem="an action must be a single call: tool_name(arguments)")
        if node.func.id not in tool_names:
            names = ", ".join(sorted(tool_names))
            return Action(problem=f"unknown tool {node.func.id!r}; the tools are: {names}")
        return Action(code=call)
    m = _TEXT_ANSWER.search(reply)
    return Action(answer=m.group(1).strip() if m else _solution(reply))


def _solution(reply: str) -> str | None:
    found = _SOLUTION.findall(reply)
    return found[-1].strip() if found else None


def _strip_fence(block: str) -> str:
    m = _FENCE.match(block.strip())
    return m.group(1) if m else block


def _dedent(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def _first_json_object(reply: str) -> dict | None:
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
