"""Events: what a task's stream carries, one per step, in order.

An event's ``data`` is bounded (see ``bound``) so a stream entry stays small whatever the
model or the code printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.text import cut_middle


class EventType(StrEnum):
    QUEUED = "task.queued"
    STARTED = "task.started"
    LLM_REPLY = "llm.reply"
    EXEC_RESULT = "exec.result"
    RETRYING = "task.retrying"
    FINISHED = "task.finished"


MAX_FIELD_CHARS = 8_000


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    turn: int
    attempt: int
    ts: float  # unix seconds
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type.value,
            "turn": self.turn,
            "attempt": self.attempt,
            "ts": self.ts,
            "data": self.data,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(
            type=EventType(d["type"]),
            turn=int(d["turn"]),
            attempt=int(d["attempt"]),
            ts=float(d["ts"]),
            data=dict(d.get("data") or {}),
        )

    @property
    def terminal(self) -> bool:
        return self.type is EventType.FINISHED


def bound(data: dict[str, Any], max_chars: int = MAX_FIELD_CHARS) -> dict[str, Any]:
    """Cap every string value of ``data`` at ``max_chars`` (head and tail kept).

    Capped fields are listed under ``"truncated"`` so a reader knows the text is partial.
    """
    out: dict[str, Any] = {}
    cut: list[str] = []
    for key, value in data.items():
        if isinstance(value, str) and len(value) > max_chars:
            out[key] = cut_middle(value, max_chars)
            cut.append(key)
        else:
            out[key] = value
    if cut:
        out["truncated"] = cut
    return out
