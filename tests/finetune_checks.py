"""The checks of OpenAI's "Data preparation and analysis for chat model fine-tuning"
cookbook, reimplemented, plus the stricter shape an actfleet export promises.

``format_errors`` counts the cookbook's error types over a dataset (``data_type``,
``missing_messages_list``, ``message_missing_key``, ``message_unrecognized_key``,
``unrecognized_role``, ``missing_content``, ``example_missing_assistant_message``);
``warnings`` counts its data warnings (examples without a system or a user message).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

COOKBOOK_KEYS = ("role", "content", "name", "function_call", "weight")
COOKBOOK_ROLES = ("system", "user", "assistant", "function")


def format_errors(dataset: Iterable[Any]) -> Counter[str]:
    errors: Counter[str] = Counter()
    for ex in dataset:
        if not isinstance(ex, dict):
            errors["data_type"] += 1
            continue
        messages = ex.get("messages")
        if not messages:
            errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                errors["message_missing_key"] += 1
            if any(k not in COOKBOOK_KEYS for k in message):
                errors["message_unrecognized_key"] += 1
            if message.get("role") not in COOKBOOK_ROLES:
                errors["unrecognized_role"] += 1
            content = message.get("content")
            function_call = message.get("function_call")
            if (not content and not function_call) or not isinstance(content, str):
                errors["missing_content"] += 1
        if not any(m.get("role") == "assistant" for m in messages):
            errors["example_missing_assistant_message"] += 1
    return errors


def warnings(dataset: Iterable[dict[str, Any]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for ex in dataset:
        roles = {m["role"] for m in ex["messages"]}
        out["missing_system"] += "system" not in roles
        out["missing_user"] += "user" not in roles
    return out


def read_openai_export(text: str) -> list[dict[str, Any]]:
    """Parse an ``openai`` export and assert what it promises beyond the cookbook: every
    line is exactly ``{"messages": [...]}``, roles are system/user/assistant only, and
    each conversation ends with the assistant's message."""
    dataset = [json.loads(line) for line in text.splitlines()]
    assert format_errors(dataset) == Counter(), format_errors(dataset)
    assert warnings(dataset) == Counter(missing_system=0, missing_user=0)
    for ex in dataset:
        assert set(ex) == {"messages"}
        assert {m["role"] for m in ex["messages"]} <= {"system", "user", "assistant"}
        assert all(set(m) == {"role", "content"} for m in ex["messages"])
        assert ex["messages"][-1]["role"] == "assistant"
    return dataset


def read_sharegpt_export(text: str) -> list[dict[str, Any]]:
    dataset = [json.loads(line) for line in text.splitlines()]
    for ex in dataset:
        assert set(ex) == {"conversations"}
        turns = ex["conversations"]
        assert turns and all(set(t) == {"from", "value"} for t in turns)
        assert {t["from"] for t in turns} <= {"system", "human", "gpt"}
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        assert turns[-1]["from"] == "gpt"
    return dataset
