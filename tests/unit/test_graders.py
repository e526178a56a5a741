"""Graders give the right verdicts, including the awkward cases."""

import pytest

from agent.graders import grade, parse_number
from agent.models import Expected


@pytest.mark.parametrize(
    ("expected", "answer", "verdict"),
    [
        (Expected("Paris"), " Paris\n", True),
        (Expected("Paris"), "paris", False),
        (Expected(42, "exact"), "42", True),
        (Expected(3.14159, "numeric", 0.001), "3.1416", True),
        (Expected(3.14159, "numeric", 0.00001), "3.1416", False),
        (Expected("1,000", "numeric"), "$1000", True),
        (Expected(50, "numeric"), "50%", True),
        (Expected(7, "numeric"), "The answer is 7.", True),
        (Expected(7, "numeric"), "seven", False),
        (Expected("blue", "contains"), "The sky is BLUE today", True),
        (Expected("green", "contains"), "The sky is blue", False),
        (Expected(r"^\d{3}-\d{4}$", "regex"), "555-1234", True),
        (Expected(r"^\d{3}-\d{4}$", "regex"), "555-12345", False),
        (Expected([1, 2, 3], "python_literal"), "(1, 2, 3)", True),
        (Expected([1, 2.0], "python_literal"), "[1.0, 2]", True),
        (Expected({"a": 1, "b": 2}, "python_literal"), "{'b': 2, 'a': 1}", True),
        (Expected("{1, 2}", "python_literal"), "{2, 1}", True),
        (Expected([1, 2], "python_literal"), "[2, 1]", False),
        (Expected(True, "python_literal"), "1", False),
        (Expected("hello", "python_literal"), "'hello'", True),
        (Expected([0.1, 0.2], "python_literal", 1e-9), "[0.1, 0.20000000000000004]", True),
    ],
)
def test_graders(expected: Expected, answer: str, verdict: bool) -> None:
    assert grade(expected, answer) is verdict


def test_no_answer_is_never_correct() -> None:
    assert grade(Expected("x"), None) is False


def test_parse_number_handles_separators_and_signs() -> None:
    assert parse_number("-1,234.5") == -1234.5
    assert parse_number("1e3") == 1000.0
    assert parse_number("none") is None
