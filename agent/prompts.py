"""The system prompt of each action format and the fixed messages the loop sends.

The tools are the same Python functions in the sandbox whatever the format; each format's
prompt documents them its own way: ``code`` as Python signatures already defined in the
session, ``json`` as JSON schemas of the arguments of a ``{"tool": ..., "arguments": ...}``
call, ``text`` as the positional ``Action: tool_name, argument_1 End Action`` line of the
paper's text format. Each prompt tells the model to stop after its action and never to
write an observation itself (the loop's stop sequences enforce it, see ``agent.actions``).
"""

from __future__ import annotations

import ast
import json
from typing import Any

from agent.models import TaskSpec, Tool

CODE_PROMPT = """You are a helpful assistant that solves tasks by writing and running Python code.

At each turn, first think briefly, then do exactly one of:
1. Run Python code by wrapping it in <execute> and </execute>. The code runs in a persistent
   Python session, like a Jupyter notebook: variables, functions and imports from earlier
   turns are still defined. Stop after </execute>: the output (printed text, the value of
   the last expression, or the error traceback) comes back to you as the next message,
   starting with "Observation:". Never write an observation yourself.
2. Give your final answer by wrapping it in <solution> and </solution>. Put only the answer
   inside the tags, with no explanation.

Rules:
- Write one <execute> block per turn and wait for its observation before going on.
- Use print() to see values. If your code raises an error, read the traceback and fix it.
- Do not answer until you have seen the output that supports the answer; once you have,
  answer at once instead of running the same code again.
- The session has no internet access unless the task says otherwise. Files are in the
  current working directory.
{tools}"""

JSON_PROMPT = """You are a helpful assistant that solves tasks by calling tools.

At each turn, first think briefly, then write exactly one JSON object, on a line of its own:
1. To call a tool: {{"tool": "<tool name>", "arguments": {{"<parameter>": <value>, ...}}}}
   Then stop. The tool's result comes back to you as the next message, starting with
   "Observation:". Never write an observation yourself.
2. To give your final answer: {{"answer": <your final answer>}}
   Put only the answer there, with no explanation.

Rules:
- Call one tool per turn and wait for its result before going on.
- Arguments are JSON values: strings in double quotes, numbers, true, false, null, lists
  and objects. To use a result, copy its value into the next call's arguments.
- Do not answer until you have seen the results that support the answer; once you have,
  answer at once instead of calling the same tool again.
{tools}"""

TEXT_PROMPT = """You are a helpful assistant that solves tasks by calling tools.

At each turn, first think briefly, then end your reply with exactly one of these lines:
1. To call a tool: Action: tool_name, argument_1, argument_2 End Action
   The tool's name comes first, then its arguments in the order of its signature,
   separated by commas. Then stop. The tool's result comes back to you as the next
   message, starting with "Observation:". Never write an observation yourself.
2. To give your final answer: Answer: your final answer
   Put only the answer there, with no explanation.

Rules:
- Call one tool per turn and wait for its result before going on.
- Write strings in quotes when they contain a comma.
- Do not answer until you have seen the results that support the answer; once you have,
  answer at once instead of calling the same tool again.
{tools}"""

_PROMPTS = {"code": CODE_PROMPT, "json": JSON_PROMPT, "text": TEXT_PROMPT}

# How each format gives an answer, for the messages below.
ANSWER_SYNTAX = {
    "code": "<solution>your answer</solution>",
    "json": '{"answer": <your answer>}',
    "text": "Answer: your answer",
}
ACTION_SYNTAX = {
    "code": "code in <execute>...</execute>",
    "json": 'a tool call {"tool": "<tool name>", "arguments": {...}}',
    "text": "an action line Action: tool_name, argument_1 End Action",
}

IGNORED_SOLUTION = (
    "[Your reply held both code and a solution. The code was run; the solution was ignored. "
    "Check the output above, then give the solution on its own.]"
)


def system_prompt(spec: TaskSpec) -> str:
    if spec.system_prompt is not None:
        return spec.system_prompt
    template = _PROMPTS.get(spec.action_format, CODE_PROMPT)
    return template.format(tools=_tools_section(spec.tools, spec.action_format))


def nudge(action_format: str) -> str:
    """The reply to a reply with neither an action nor an answer."""
    fmt = action_format if action_format in _PROMPTS else "code"
    return (
        f"Your reply contained neither {ACTION_SYNTAX[fmt]} nor a final answer "
        f"({ANSWER_SYNTAX[fmt]}). Act to make progress, or give the answer, "
        "in exactly that form."
    )


def problem_note(problem: str, action_format: str) -> str:
    """The reply to an action that could not be used: what was wrong and the right form."""
    fmt = action_format if action_format in _PROMPTS else "code"
    return f"Your action could not be used: {problem}. Write {ACTION_SYNTAX[fmt]}."


def repeated_note(action_format: str) -> str:
    """Appended to the observation of an action the model has already run with this very
    output: running it again told it nothing new."""
    what = "code" if action_format == "code" else "tool call"
    return (
        f"[You already ran this exact {what} and saw this same output. Running it again "
        "tells you nothing new. If the output above answers the task, give your final "
        f"answer now: {ANSWER_SYNTAX.get(action_format, ANSWER_SYNTAX['code'])}]"
    )


def last_turn_note(action_format: str) -> str:
    """Appended to the message that opens the model's last turn."""
    return (
        "[This is your last turn: give your final answer now, as "
        f"{ANSWER_SYNTAX.get(action_format, ANSWER_SYNTAX['code'])}.]"
    )


# -- documenting the tools --------------------------------------------------------------


def _tools_section(tools: tuple[Tool, ...], action_format: str) -> str:
    if not tools:
        return ""
    if action_format == "json":
        lines = ["\nThe tools, with the JSON schema of their arguments:"]
        lines += [json.dumps(json_schema(t), ensure_ascii=False) for t in tools]
    elif action_format == "text":
        lines = ["\nThe tools:"]
        for i, tool in enumerate(tools, 1):
            lines.append(f"[{i}] {tool.name}: {tool.description or 'no description'}")
            lines.append(f"    Signature: {_signature(tool)}")
            params = [f"<{p['name']}>" for p in parameters(tool) or []]
            example = ", ".join([tool.name, *params])
            lines.append(f"    Call it as: Action: {example} End Action")
    else:
        lines = ["\nThese tools are already defined in the Python session; use them:"]
        for tool in tools:
            desc = f": {tool.description}" if tool.description else ""
            lines.append(f"- {_signature(tool)}{desc}")
    return "\n".join(lines) + "\n"


def _signature(tool: Tool) -> str:
    signature = tool.signature or f"{tool.name}(...)"
    return signature if signature.startswith(tool.name) else f"{tool.name}{signature}"


_JSON_TYPES = {
    "int": "integer",
    "float": "number",
    "complex": "number",
    "str": "string",
    "bool": "boolean",
    "list": "array",
    "tuple": "array",
    "set": "array",
    "dict": "object",
    "None": "null",
}


def parameters(tool: Tool) -> list[dict[str, Any]] | None:
    """The parameters of a tool's Python signature (name, annotation, whether required),
    or ``None`` when the signature is not one Python can read."""
    try:
        fn = ast.parse(f"def {_signature(tool)}: pass").body[0]
    except SyntaxError:
        return None
    if not isinstance(fn, ast.FunctionDef):
        return None
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    required_from = len(positional) - len(a.defaults)
    out = []
    for i, arg in enumerate(positional):
        out.append(_param(arg, required=i < required_from))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append(_param(arg, required=default is None))
    return out


def _param(arg: ast.arg, required: bool) -> dict[str, Any]:
    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
    return {"name": arg.arg, "annotation": annotation, "required": required}


def json_schema(tool: Tool) -> dict[str, Any]:
    """A tool as a function-calling model expects to read it: name, description and a
    JSON schema of its arguments (the Python signature when it cannot be read)."""
    params = parameters(tool)
    out: dict[str, Any] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    if params is None:
        out["signature"] = _signature(tool)
        return out
    properties: dict[str, Any] = {}
    for p in params:
        properties[p["name"]] = _json_type(p["annotation"])
    out["parameters"] = {
        "type": "object",
        "properties": properties,
        "required": [p["name"] for p in params if p["required"]],
    }
    return out


def _json_type(annotation: str | None) -> dict[str, str]:
    if annotation is None:
        return {}
    base = annotation.split("[", 1)[0].strip().rsplit(".", 1)[-1]
    kind = _JSON_TYPES.get(base) or _JSON_TYPES.get(base.lower())
    if base in ("List", "Tuple", "Set", "Sequence"):
        kind = "array"
    elif base in ("Dict", "Mapping"):
        kind = "object"
    return {"type": kind} if kind else {"description": annotation}
