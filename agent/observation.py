"""Turning an execution result into the next user message, within a size cap."""

from __future__ import annotations

from agent.sandbox import ExecResult
from agent.text import cut_middle

OBSERVATION_PREFIX = "Observation:\n"
NO_OUTPUT = "[The code ran and printed nothing.]"


def cap(text: str, max_chars: int) -> str:
    """Keep the head (two thirds) and the tail of ``text`` within ``max_chars``."""
    return cut_middle(text, max_chars, head_share=2 / 3)


def format_observation(result: ExecResult, max_output_chars: int) -> str:
    """The observation the model reads: output, the last expression's value or the
    traceback, and what happened to the session if it timed out or was lost."""
    parts: list[str] = []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
    if result.value is not None:
        parts.append(f"Out: {result.value}")
    if result.error:
        parts.append(result.error.rstrip("\n"))
    if result.timed_out and not result.state_lost:
        parts.append(
            f"[The execution was interrupted after {result.duration_s:.0f}s (time limit). "
            "Variables defined before the interruption are still there.]"
        )
    if result.state_lost:
        parts.append(
            "["
            + (result.note or "The sandbox was restarted: all variables and imports were lost.")
            + "]"
        )
    elif result.note:
        parts.append(f"[{result.note}]")
    body = "\n".join(parts) if parts else NO_OUTPUT
    return OBSERVATION_PREFIX + cap(body, max_output_chars)
