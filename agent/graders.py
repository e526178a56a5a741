"""Graders: does an answer match ``expected``? Pure functions of two values, bounded.

``exact`` compares stripped text; ``numeric`` parses a number (commas, a currency sign or a
percent sign allowed) and compares within ``tolerance`` (absolute; default 1e-6, with a
relative 1e-9 as well); ``contains`` is a case-insensitive substring test; ``regex``
searches the answer with a ``RegexEngine`` (RE2 in the fleet: linear time, whatever the
pattern); ``python_literal`` compares Python values, so ``1 == 1.0``, ``(1, 2) == [1, 2]``
and dict order does not matter.

Every grader takes time linear in its input, or close: an answer longer than
``MAX_GRADED_CHARS`` is not graded, numbers are parsed with a pattern that cannot
backtrack, and an answer that cannot be graded raises ``GradingError``, which the loop
turns into a clear grading failure.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

from agent.errors import GradingError
from agent.models import Expected

MAX_GRADED_CHARS = 100_000
MAX_NUMBER_CHARS = 400  # a number's text: more digits than any float holds, many times over
# No part of a number can be matched two ways, so a failing match does not backtrack.
_NUMBER = re.compile(r"[-+]?(?:\d[\d,_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class RegexEngine(Protocol):
    def search(self, pattern: str, text: str) -> bool:
        """Whether ``pattern`` matches somewhere in ``text``, in time linear in ``text``;
        ``GradingError`` for a pattern the engine cannot run."""
        ...


def grade(expected: Expected, answer: str | None, regex: RegexEngine | None = None) -> bool:
    """The verdict; ``GradingError`` if the answer cannot be graded (too long, or a regex
    grader without an engine or with a pattern the engine refuses)."""
    if answer is None:
        return False
    if len(answer) > MAX_GRADED_CHARS:
        raise GradingError(
            f"the answer is {len(answer)} characters; graders read at most {MAX_GRADED_CHARS}"
        )
    if expected.grader == "regex":
        if regex is None:
            raise GradingError("no regex engine is configured for the regex grader")
        return regex.search(_text(expected.answer), answer.strip())
    return _GRADERS[expected.grader](expected, answer)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _exact(expected: Expected, answer: str) -> bool:
    return answer.strip() == _text(expected.answer).strip()


def _contains(expected: Expected, answer: str) -> bool:
    return _text(expected.answer).strip().lower() in answer.lower()


def parse_number(text: str) -> float | None:
    """The number in ``text`` (the whole text, else its first number), or None; a number
    too large for a float is ``inf``."""
    cleaned = text.strip().strip("$€£%").strip()
    found = _NUMBER.fullmatch(cleaned) or _NUMBER.search(cleaned)
    if not found or len(found.group(0)) > MAX_NUMBER_CHARS:
        return None
    try:
        return float(found.group(0).replace(",", "").replace("_", ""))
    except ValueError:
        return None


def _float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range
        return math.inf if value > 0 else -math.inf


def _numeric(expected: Expected, answer: str) -> bool:
    got = parse_number(answer)
    want = expected.answer
    if isinstance(want, bool):
        return False
    want = _float(want) if isinstance(want, int | float) else parse_number(_text(want))
    if got is None or want is None or math.isinf(got) or math.isinf(want):
        return False
    tol = 1e-6 if expected.tolerance is None else expected.tolerance
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=tol)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.strip()


def _normalize(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {_hashable(_normalize(k)): _normalize(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return frozenset(_hashable(_normalize(v)) for v in value)
    return value


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _same(a: Any, b: Any, tol: float | None) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, int | float) and isinstance(b, int | float):
        if tol is None:
            return a == b
        if isinstance(a, int) and isinstance(b, int):  # exact, however large
            return abs(a - b) <= tol
        return math.isclose(_float(a), _float(b), abs_tol=tol, rel_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    return bool(a == b)


def _python_literal(expected: Expected, answer: str) -> bool:
    want = expected.answer
    if isinstance(want, str):
        want = _literal(want)
    try:
        return _same(_normalize(_literal(answer)), _normalize(want), expected.tolerance)
    except RecursionError as e:  # a literal nested deeper than the parser's own limit allows
        raise GradingError("the answer is nested too deeply to compare") from e


_GRADERS: dict[str, Callable[[Expected, str], bool]] = {
    "exact": _exact,
    "numeric": _numeric,
    "contains": _contains,
    "python_literal": _python_literal,
}
