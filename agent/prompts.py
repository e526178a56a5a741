"""The CodeAct system prompt and the fixed messages the loop sends."""

from __future__ import annotations

from agent.models import TaskSpec, Tool

CODE_PROMPT = """You are a helpful assistant that solves tasks by writing and running Python code.

At each turn, first think briefly, then do exactly one of:
1. Run Python code by wrapping it in <execute> and </execute>. The code runs in a persistent
   Python session, like a Jupyter notebook: variables, functions and imports from earlier
   turns are still defined. The output (printed text, the value of the last expression, or
   the error traceback) comes back to you as the next message, starting with "Observation:".
2. Give your final answer by wrapping it in <solution> and </solution>. Put only the answer
   inside the tags, with no explanation.

Rules:
- Write one <execute> block per turn and wait for its observation before going on.
- Use print() to see values. If your code raises an error, read the traceback and fix it.
- Do not answer until you have seen the output that supports the answer.
- The session has no internet access unless the task says otherwise. Files are in the
  current working directory.
{tools}"""

JSON_PROMPT = """You are a helpful assistant that solves tasks by calling tools.

At each turn, reply with exactly one JSON object and nothing else:
- {{"tool": "<tool name>", "arguments": {{"<arg>": <value>, ...}}}} to call a tool; its result
  comes back as the next message, starting with "Observation:".
- {{"answer": <final answer>}} when you know the answer.
{tools}"""

TEXT_PROMPT = """You are a helpful assistant that solves tasks by calling tools.

At each turn, end your reply with exactly one line:
- Action: tool_name(arguments)   to call a tool written as a Python call; its result comes
  back as the next message, starting with "Observation:".
- Answer: <final answer>         when you know the answer.
{tools}"""

NUDGE = (
    "Your reply contained neither code in <execute>...</execute> nor a final answer in "
    "<solution>...</solution>. Run code to make progress, or give the answer."
)
NUDGE_OTHER_FORMATS = {
    "json": 'Reply with one JSON object: {"tool": ..., "arguments": {...}} or {"answer": ...}.',
    "text": "End your reply with a line 'Action: tool_name(arguments)' or 'Answer: ...'.",
}
IGNORED_SOLUTION = (
    "[Your reply held both code and a solution. The code was run; the solution was ignored. "
    "Check the output above, then give the solution on its own.]"
)


def system_prompt(spec: TaskSpec) -> str:
    if spec.system_prompt is not None:
        return spec.system_prompt
    template = {"json": JSON_PROMPT, "text": TEXT_PROMPT}.get(spec.action_format, CODE_PROMPT)
    return template.format(tools=_tools_section(spec.tools, spec.action_format))


def nudge(action_format: str) -> str:
    return NUDGE_OTHER_FORMATS.get(action_format, NUDGE)


def _tools_section(tools: tuple[Tool, ...], action_format: str) -> str:
    if not tools:
        return ""
    where = "already defined in the Python session" if action_format == "code" else "available"
    lines = [f"\nThese tools are {where}; use them:"]
    for tool in tools:
        signature = tool.signature or f"{tool.name}(...)"
        if not signature.startswith(tool.name):
            signature = f"{tool.name}{signature}"
        lines.append(f"- {signature}" + (f": {tool.description}" if tool.description else ""))
    return "\n".join(lines) + "\n"
