"""The fast check of common specs (``agent.specfast``) says yes only where the Checker says
yes, with the same values, so a spec it passes is stored byte for byte as the Checker's
path would store it; everything else gets the Checker's own problems."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

import agent.models
from agent.errors import SpecError
from agent.models import TaskSpec
from agent.specfast import ASK, _Ask, fast_fields
from agent.specschema import TASK_SPEC, Checker, Flag, Number, Section, find, narrow
from store.records import TaskRecord

B64 = "eHl6"

# values per field: valid ones first, then ones the Checker refuses or that need a look
CHOICES: dict[str, list[Any]] = {
    "prompt": ["Task 1: compute 7 * 6", "x" * 300, "  ", "", 5, None, ["a"], "é中\U0001f600"],
    "custom_id": ["task-0000001", "a:b/c@d+e=f", "bad id", "", "x" * 129, 7, None],
    "model": ["m", "x" * 257, None, 1.5],
    "system_prompt": ["be brief", None, True],
    "setup_code": ["x = 1", None, {}],
    "tools": [
        [{"name": "fib", "signature": "fib(n)", "description": "d"}],
        [{"name": "f"}, {"name": "g", "signature": None}],
        [{"name": "1bad"}],
        [{"name": "f", "extra": 1}],
        [],
        None,
        "f",
    ],
    "files": [
        [{"path": "a/b.txt", "content_b64": B64}],
        [{"path": "a", "content_b64": B64}, {"path": "a/b", "content_b64": B64}],
        [{"path": "../x", "content_b64": B64}],
        [{"path": "x", "content_b64": "not base64"}],
        [],
        None,
    ],
    "limits": [
        {"max_turns": 4},
        {"max_turns": 4.0, "timeout_s": 60, "exec_timeout_s": 1.5, "max_tokens": 1000},
        {"max_turns": 4.5},
        {"max_turns": True},
        {"max_turns": 0},
        {"timeout_s": 1e400},
        {"timeout_s": math.nan},
        {"max_output_chars": 10**30},
        {"max_turns": None},
        {"unknown": 1},
        {},
        None,
        [],
    ],
    "sandbox": [
        {"memory_mb": 1024, "cpus": 2},
        {"network": False},
        {"network": True},
        {"memory_mb": 10**6},
        {"cpus": 0.05},
        {"image": "python:3.12"},
        None,
    ],
    "llm": [{"temperature": 0.5, "seed": 7}, {"temperature": 3}, {"seed": -1}, {}, None],
    "expected": [
        {"answer": "42", "grader": "numeric"},
        {"answer": 42, "grader": "numeric", "tolerance": 0.5},
        {"answer": None},
        {"answer": [1, {"a": 2}], "grader": "python_literal"},
        {"answer": 10**40, "grader": "exact"},
        {"answer": "a+", "grader": "regex"},
        {"answer": 5, "grader": "regex"},
        {"answer": "x", "grader": "fuzzy"},
        {"grader": "exact"},
        None,
    ],
    "action_format": ["code", "json", "text", "yaml", None],
    "webhook": [{"url": "https://example.com/hook"}, {"url": "ftp://x"}, {"url": 5}, None],
    "metadata": [{"team": "a", "run": "7"}, {"k": 5}, {"x" * 129: "v"}, {}, None, "m"],
}


def varied_specs(n: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    specs: list[Any] = []
    for _ in range(n):
        raw: dict[str, Any] = {"prompt": rng.choice(CHOICES["prompt"][:2])}
        for name in rng.sample(sorted(CHOICES), rng.randint(0, 6)):
            # mostly valid values, so that most specs pass and both paths build them
            options = CHOICES[name]
            raw[name] = options[0] if rng.random() < 0.5 else rng.choice(options)
        if rng.random() < 0.05:
            raw["unknown_field"] = 1
        if rng.random() < 0.05:
            del raw["prompt"]
        specs.append(raw)
    return [*specs, "not an object", [], None]


NARROWED = narrow(
    TASK_SPEC,
    {
        "sandbox.memory_mb": Number(64, 2048, integer=True, cap="this server's cap"),
        "sandbox.network": Flag(only=False, refusal="no network here"),
    },
)


def checker_only(raw: Any, table: Section, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(agent.models, "fast_fields", lambda _table: lambda _raw: ASK)
        return read(raw, table)


def read(raw: Any, table: Section) -> TaskSpec | list[str]:
    try:
        return TaskSpec.from_dict(raw, table)
    except SpecError as e:
        return e.problems


def stored(spec: TaskSpec) -> dict[str, str]:
    return TaskRecord(id="task_1", tenant="t", spec=spec, batch_id="b", created_at=1.5).to_hash()


@pytest.mark.parametrize("table", [TASK_SPEC, NARROWED], ids=["full", "narrowed"])
def test_a_spec_reads_the_same_with_and_without_the_fast_check(
    table: Section, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given varied specs, valid and not, through a server's full and narrowed rules
    fast_yes = 0
    for raw in varied_specs(3000, seed=7):
        # when each is read with the fast check, and with the Checker alone
        got, want = read(raw, table), checker_only(raw, table, monkeypatch)
        # then both give the same problems, or the same spec, stored byte for byte alike
        if isinstance(want, list):
            assert got == want, raw
            continue
        assert isinstance(got, TaskSpec), raw
        assert got == want, raw
        assert stored(got) == stored(want), raw
        fast_yes += fast_fields(table)(raw) is not ASK
    assert fast_yes > 500  # the fast check did answer for most valid specs


@pytest.mark.parametrize("table", [TASK_SPEC, NARROWED], ids=["full", "narrowed"])
def test_the_fast_check_says_yes_only_where_the_checker_finds_nothing(table: Section) -> None:
    for raw in varied_specs(3000, seed=11):
        fast = fast_fields(table)(raw)
        if isinstance(fast, _Ask):
            continue
        checker = Checker()
        slow, complete = checker.fields(table, raw, "")
        assert checker.problems == [] and complete, raw
        # the same values of the same types (4 and 4.0 are equal, but stored apart)
        assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True), raw


def test_the_fast_check_answers_the_typical_spec() -> None:
    raw = {
        "prompt": "Task 3: compute 3 * 7 and answer with the number only.",
        "custom_id": "task-0000003",
        "limits": {"max_turns": 4},
        "expected": {"answer": "21", "grader": "numeric"},
    }
    assert fast_fields(TASK_SPEC)(raw) == raw
    assert fast_fields(find(TASK_SPEC, "limits").kind)({"max_turns": 4.0}) == {"max_turns": 4}  # type: ignore[arg-type]
