"""Graders give the right verdicts, including the awkward cases, in bounded time."""

import pytest

from agent.errors import GradingError
from agent.graders import MAX_GRADED_CHARS, grade, parse_number
from agent.models import Expected
from tests.fakes import PythonRegex


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
    assert grade(expected, answer, PythonRegex()) is verdict


def test_no_answer_is_never_correct() -> None:
    assert grade(Expected("x"), None) is False


def test_parse_number_handles_separators_and_signs() -> None:
    assert parse_number("-1,234.5") == -1234.5
    assert parse_number("1e3") == 1000.0
    assert parse_number("none") is None


@pytest.mark.timeout(60)
def test_a_long_run_of_digits_is_parsed_in_linear_time() -> None:
    # Given an answer of 99,000 digits that is not a number as a whole: a number pattern
    # that can split a run of digits two ways tries every split (minutes of CPU)
    answer = "1" * 99_000 + "x"
    # Then the numeric grader still answers, and a number that long is no number
    assert grade(Expected(7, "numeric"), answer) is False
    assert parse_number(answer) is None
    assert parse_number("1" * 300) == float("1" * 300)


@pytest.mark.parametrize(
    ("expected", "answer"),
    [
        (Expected(1.5, "python_literal", 0.1), "1" * 4000),  # an int beyond a float
        (Expected([10**400], "python_literal", 0.5), "[1.5]"),
        (Expected(10**400, "numeric"), "5"),
        (Expected(5, "numeric"), "1e999"),
    ],
)
def test_numbers_beyond_a_float_grade_false_instead_of_raising(
    expected: Expected, answer: str
) -> None:
    assert grade(expected, answer) is False


def test_huge_ints_compare_exactly_within_a_tolerance() -> None:
    assert grade(Expected(10**400, "python_literal", 1), str(10**400 + 1)) is True
    assert grade(Expected(10**400, "python_literal", 1), str(10**400 + 2)) is False


def test_an_answer_too_long_to_grade_is_a_grading_error() -> None:
    with pytest.raises(GradingError, match=f"at most {MAX_GRADED_CHARS}"):
        grade(Expected("x", "contains"), "x" * (MAX_GRADED_CHARS + 1))


def test_the_regex_grader_needs_an_engine() -> None:
    with pytest.raises(GradingError, match="no regex engine"):
        grade(Expected("a+", "regex"), "aaa")


def test_a_deeply_nested_literal_is_compared_as_text_not_a_crash() -> None:
    nested = "[" * 5000 + "]" * 5000
    assert grade(Expected(nested, "python_literal"), nested) is True
    assert grade(Expected([[1]], "python_literal"), nested) is False
