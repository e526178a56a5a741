"""A batch's results in the formats users take away: fine-tuning data and result rows.

Pure functions of one results line (what ``GET /v1/batches/{id}/results`` streams, with
``messages`` when the trajectory was asked for), shared by the API's export route and the
CLI's export of a local results file, so both give the same bytes.

- ``openai``: ``{"messages": [...]}`` and nothing else, roles ``system``/``user``/
  ``assistant``, ending with the assistant's answer: the chat fine-tuning format.
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}``.
- ``results``: the results line itself (``custom_id``, ``status``, ``answer``,
  ``correct``, ``turns``, ``usage``, ``timings``, ...), with ``messages`` only if asked.

A fine-tuning example ends with an answer, so the two trajectory formats hold only tasks
that completed; ``Filter`` narrows any format further, as the paper's authors kept only
successful trajectories for CodeActInstruct. A turn in which the model said nothing (an
empty reply and the nudge after it) is left out of a conversation: an empty message fails
the format checks and teaches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = ("openai", "sharegpt", "results")
TRAJECTORY_FORMATS = frozenset({"openai", "sharegpt"})
_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass(frozen=True, slots=True)
class Filter:
    """Which tasks an export keeps: all by default."""

    only_correct: bool = False  # graded and correct
    only_completed: bool = False  # the agent gave an answer (graded or not)
    max_turns: int | None = None  # at most this many turns

    def keeps(self, line: Mapping[str, Any]) -> bool:
        if self.only_correct and line.get("correct") is not True:
            return False
        if self.only_completed and line.get("status") != "completed":
            return False
        return self.max_turns is None or int(line.get("turns") or 0) <= self.max_turns


def needs_trajectory(fmt: str) -> bool:
    return fmt in TRAJECTORY_FORMATS


def export_line(
    line: Mapping[str, Any], fmt: str, keep: Filter | None = None, trajectory: bool = False
) -> dict[str, Any] | None:
    """The export of one results line in ``fmt``, or ``None`` when it is left out (the
    filter drops it, or a trajectory format has no answered conversation for it).
    ``trajectory`` keeps ``messages`` in the ``results`` format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if keep is not None and not keep.keeps(line):
        return None
    if fmt == "results":
        if trajectory:
            return dict(line)
        return {k: v for k, v in line.items() if k != "messages"}
    if line.get("status") != "completed":
        return None
    messages = conversation(line.get("messages") or ())
    if messages is None:
        return None
    if fmt == "openai":
        return {"messages": messages}
    return {
        "conversations": [
            {"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages
        ]
    }


def conversation(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]] | None:
    """A trajectory as clean chat messages ending with the assistant's answer, or ``None``
    when it does not end with an assistant reply or holds a message it cannot carry."""
    out: list[dict[str, str]] = []
    skip_nudge = False
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in _SHAREGPT_FROM or not isinstance(content, str):
            return None
        if skip_nudge and role == "user":
            skip_nudge = False
            continue
        skip_nudge = False
        if not content.strip():
            skip_nudge = role == "assistant"  # the nudge it got is left out with it
            continue
        out.append({"role": role, "content": content})
    if not out or out[-1]["role"] != "assistant":
        return None
    return out
