"""Task spec validation: every problem reported, each saying what to fix."""

import base64

import pytest

from agent.errors import SpecError
from agent.models import Limits, Result, Status, TaskSpec


def test_a_minimal_spec_takes_the_documented_defaults() -> None:
    spec = TaskSpec.from_dict({"prompt": "hi"})
    assert spec.limits == Limits(
        max_turns=10, timeout_s=900, exec_timeout_s=30, max_output_chars=2000
    )
    assert spec.sandbox.network is False and spec.sandbox.memory_mb == 512
    assert spec.action_format == "code"


def test_a_full_spec_round_trips() -> None:
    raw = {
        "prompt": "p",
        "custom_id": "row-1",
        "model": "m",
        "setup_code": "def f(): return 1",
        "tools": [{"name": "f", "signature": "f() -> int", "description": "one"}],
        "files": [{"path": "data/x.csv", "content_b64": base64.b64encode(b"a,b").decode()}],
        "limits": {"max_turns": 3, "max_tokens": 5000},
        "sandbox": {"memory_mb": 256, "network": True},
        "llm": {"temperature": 0.5, "seed": 7},
        "expected": {"answer": 1.5, "grader": "numeric", "tolerance": 0.1},
        "webhook": {"url": "https://example.invalid/hook"},
        "metadata": {"suite": "smoke"},
    }
    spec = TaskSpec.from_dict(raw)
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert spec.files[0].content() == b"a,b"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        TaskSpec.from_dict(
            {
                "promt": "typo",
                "limits": {"max_turns": 0, "exec_timeout_s": "soon"},
                "files": [{"path": "../etc/passwd", "content_b64": "!!"}],
                "expected": {"answer": "(", "grader": "regex"},
                "action_format": "xml",
            }
        )
    problems = info.value.problems
    joined = "\n".join(problems)
    assert "promt: unknown field" in joined
    assert "prompt: is required" in joined
    assert "limits.max_turns: must be between 1 and 200, got 0" in joined
    assert "limits.exec_timeout_s: expected a number, got a string" in joined
    assert "files[0].path: must be a relative path" in joined
    assert "files[0].content_b64: is not valid base64" in joined
    assert "action_format: must be one of code, json, text" in joined


@pytest.mark.parametrize("raw", [None, [], "prompt", 3])
def test_a_spec_must_be_an_object(raw: object) -> None:
    with pytest.raises(SpecError, match="expected a JSON object"):
        TaskSpec.from_dict(raw)


def test_booleans_are_not_numbers() -> None:
    with pytest.raises(SpecError, match=r"limits\.max_turns: expected an integer, got a boolean"):
        TaskSpec.from_dict({"prompt": "x", "limits": {"max_turns": True}})


def test_terminal_statuses() -> None:
    assert {s.value for s in Status if s.terminal} == {
        "completed",
        "failed",
        "error",
        "cancelled",
        "timed_out",
    }
    assert Result.from_dict(Result(Status.FAILED).to_dict()) == Result(Status.FAILED)


def test_the_stored_form_leaves_out_defaults_and_rebuilds_an_equal_spec() -> None:
    # given a spec that changes a few fields and leaves the rest at their defaults
    spec = TaskSpec.from_dict(
        {
            "prompt": "p",
            "custom_id": "c1",
            "tools": [{"name": "lookup"}],
            "limits": {"max_turns": 4, "timeout_s": 900},
            "sandbox": {"network": False, "memory_mb": 256},
            "expected": {"answer": 0, "grader": "exact"},
        }
    )
    # when it is stored
    stored = spec.to_stored()
    # then only what differs from a default is there (an answer of 0 is kept)
    assert stored == {
        "prompt": "p",
        "custom_id": "c1",
        "tools": [{"name": "lookup"}],
        "limits": {"max_turns": 4},
        "sandbox": {"memory_mb": 256},
        "expected": {"answer": 0},
    }
    # and reading it back gives the same spec, as does the full form
    assert TaskSpec.from_stored(stored) == spec
    assert TaskSpec.from_stored(spec.to_dict()) == spec


def test_a_full_spec_survives_the_stored_form() -> None:
    spec = TaskSpec.from_dict(
        {
            "prompt": "p",
            "model": "m",
            "system_prompt": "s",
            "setup_code": "x = 1",
            "tools": [{"name": "f", "signature": "f() -> int", "description": "one"}],
            "files": [{"path": "a.txt", "content_b64": base64.b64encode(b"a").decode()}],
            "limits": {"max_turns": 3, "max_tokens": 5000, "exec_timeout_s": 5},
            "sandbox": {"memory_mb": 256, "network": True, "cpus": 0.5},
            "llm": {"temperature": 0.5, "seed": 7, "max_tokens_per_turn": 64},
            "expected": {"answer": 1.5, "grader": "numeric", "tolerance": 0.1},
            "action_format": "json",
            "webhook": {"url": "https://example.invalid/hook"},
            "metadata": {"suite": "smoke"},
        }
    )
    assert TaskSpec.from_stored(spec.to_stored()) == spec
