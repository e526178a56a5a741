"""RE2, the regex grader's engine: time linear in the answer, whatever the pattern.

The API refuses at submission a pattern RE2 cannot run (``problem``), so no task reaches a
worker with one; workers grade with ``RE2Engine`` (``agent.graders.RegexEngine``). RE2 reads
Python's syntax except backreferences, lookaround, possessive quantifiers, ``\\Z`` (RE2
spells it ``\\z``), inline comments and verbose mode; its ``$`` matches at the very end only.

A pattern that needs what RE2 lacks is refused rather than run by Python's backtracking
engine under a timeout: that engine can only be bounded by a process per grading (a thread
cannot be stopped, and it holds the GIL that the worker's other tasks need), and a caller
told at once what to change loses nothing already queued.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from agent.errors import GradingError
from agent.models import TaskSpec

MAX_PATTERN_CHARS = 10_000
MAX_MEM_BYTES = 8 * 1024 * 1024  # RE2's budget for one compiled pattern (its default)


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's, not a line on our stderr
    options.max_mem = MAX_MEM_BYTES
    return options


_OPTIONS = _options()


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> Any:
    return re2.compile(pattern, _OPTIONS)


def problem(pattern: str) -> str | None:
    """Why RE2 cannot run ``pattern`` (phrased to follow the field's name), or None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is a {len(pattern)}-character pattern; the limit is {MAX_PATTERN_CHARS}"
    try:
        _compile(pattern)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args else str(e)
        return (
            f"is not a pattern RE2 can run ({reason}): the regex grader uses RE2, which has "
            "no backreferences, lookaround, possessive quantifiers or \\Z (use \\z)"
        )
    return None


def spec_problems(spec: TaskSpec) -> list[str]:
    """A spec's problems that only the engine can see: an unusable regex grader pattern."""
    expected = spec.expected
    if expected is None or expected.grader != "regex" or not isinstance(expected.answer, str):
        return []
    why = problem(expected.answer)
    return [] if why is None else [f"expected.answer: {why}"]


class RE2Engine:
    """``agent.graders.RegexEngine`` on RE2; thread-safe."""

    def search(self, pattern: str, text: str) -> bool:
        why = problem(pattern)
        if why is not None:
            raise GradingError(f"the pattern {why}")
        return _compile(pattern).search(text) is not None
