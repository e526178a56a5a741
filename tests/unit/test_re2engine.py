"""The regex grader's engine (RE2, the real library): linear time, unusable patterns named."""

from __future__ import annotations

import pytest

from agent.errors import GradingError
from agent.loop import run_codeact
from agent.models import FailureClass, Status, TaskSpec
from engines.re2engine import MAX_PATTERN_CHARS, RE2Engine, problem, spec_problems
from tests.fakes import FakeSandbox, ScriptedLLM
from tests.unit.test_loop import drain


@pytest.mark.timeout(60)
def test_a_catastrophic_pattern_grades_at_once_with_re2() -> None:
    # Given the pattern that makes a backtracking engine run for minutes on 32 a's and a !
    task = TaskSpec.from_dict({"prompt": "p", "expected": {"answer": "^(a+)+$", "grader": "regex"}})
    llm = ScriptedLLM(["<solution>" + "a" * 32 + "!</solution>"])
    # When the loop grades the answer with RE2
    _, result = drain(run_codeact(task, llm, FakeSandbox(), model="m", regex=RE2Engine()))
    # Then it is graded, wrong, within the test's time guard
    assert result.status is Status.COMPLETED
    assert result.correct is False and result.failure_class is FailureClass.WRONG_ANSWER


@pytest.mark.parametrize(
    ("pattern", "text", "verdict"),
    [
        (r"^\d{3}-\d{4}$", "555-1234", True),
        (r"(?i)^PARIS$", "paris", True),
        (r"(?P<n>\d+) apples", "7 apples", True),
        (r"^\pL+$", "héllo", True),
        (r"a$", "a\n", False),  # RE2's $ is the very end (Python's also matches before \n)
    ],
)
def test_re2_reads_pythons_common_syntax(pattern: str, text: str, verdict: bool) -> None:
    assert problem(pattern) is None
    assert RE2Engine().search(pattern, text) is verdict


@pytest.mark.parametrize(
    "pattern", [r"(a)\1", r"(?=a)b", r"(?<!a)b", r"a++", r"x\Z", "(", "a{1001}"]
)
def test_a_pattern_re2_cannot_run_is_named_with_what_to_change(pattern: str) -> None:
    why = problem(pattern)
    assert why is not None and "RE2" in why and "lookaround" in why
    with pytest.raises(GradingError, match="the pattern is not a pattern RE2 can run"):
        RE2Engine().search(pattern, "ab")


def test_spec_problems_name_the_field_and_pass_other_graders() -> None:
    regex = TaskSpec.from_dict({"prompt": "p", "expected": {"answer": "(?=x)", "grader": "regex"}})
    exact = TaskSpec.from_dict({"prompt": "p", "expected": {"answer": "(?=x)"}})
    [found] = spec_problems(regex)
    assert found.startswith("expected.answer: is not a pattern RE2 can run (invalid perl operator")
    assert spec_problems(exact) == []
    assert "limit" in (problem("a" * (MAX_PATTERN_CHARS + 1)) or "")
