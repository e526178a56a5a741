"""Graders: does an answer match ``expected``? Pure functions of two values.

``exact`` compares stripped text; ``numeric`` parses a number (commas, a currency sign or a
percent sign allowed) and compares within ``tolerance`` (absolute; default 1e-6, with a
relative 1e-9 as well); ``contains`` is a case-insensitive substring test; ``regex``
searches the answer; ``python_literal`` compares Python values, so ``1 == 1.0``,
``(1, 2) == [1, 2]`` and dict order does not matter.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from typing import Any

from agent.models import Expected

_NUMBER = re.compile(r"[-+]?(?:\d[\d,_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def grade(expected: Expected, answer: str | None) -> bool:
    if answer is None:
        return False
    return _GRADERS[expected.grader](expected, answer)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _exact(expected: Expected, answer: str) -> bool:
    return answer.strip() == _text(expected.answer).strip()


def _contains(expected: Expected, answer: str) -> bool:
    return _text(expected.answer).strip().lower() in answer.lower()


def _regex(expected: Expected, answer: str) -> bool:
    return re.search(_text(expected.answer), answer.strip()) is not None


def parse_number(text: str) -> float | None:
    cleaned = text.strip().strip("$€£%").strip()
    found = _NUMBER.fullmatch(cleaned) or _NUMBER.search(cleaned)
    if not found:
        return None
    try:
        return float(found.group(0).replace(",", "").replace("_", ""))
    except ValueError:
        return None


def _numeric(expected: Expected, answer: str) -> bool:
    got = parse_number(answer)
    want = (
        expected.answer
        if isinstance(expected.answer, int | float)
        else parse_number(_text(expected.answer))
    )
    if got is None or want is None or isinstance(want, bool):
        return False
    tol = 1e-6 if expected.tolerance is None else expected.tolerance
    return math.isclose(got, float(want), rel_tol=1e-9, abs_tol=tol)


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
        return a == b if tol is None else math.isclose(a, b, abs_tol=tol, rel_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    return bool(a == b)


def _python_literal(expected: Expected, answer: str) -> bool:
    want = expected.answer
    if isinstance(want, str):
        want = _literal(want)
    return _same(_normalize(_literal(answer)), _normalize(want), expected.tolerance)


_GRADERS: dict[str, Callable[[Expected, str], bool]] = {
    "exact": _exact,
    "numeric": _numeric,
    "contains": _contains,
    "regex": _regex,
    "python_literal": _python_literal,
}
