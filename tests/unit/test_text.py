"""``agent.text``: the one head-and-tail cut and the one bytes-to-str rule."""

from __future__ import annotations

import pytest

from agent.events import bound
from agent.observation import cap
from agent.text import cut_middle, text_of


def test_text_that_fits_is_returned_unchanged() -> None:
    assert cut_middle("x" * 100, 100) == "x" * 100
    assert cut_middle("", 0) == ""


@pytest.mark.parametrize("max_chars", [40, 41, 99, 100, 500, 8_000])
@pytest.mark.parametrize("length", [101, 999, 10_000, 123_456])
def test_a_cut_text_fits_and_says_exactly_how_much_was_cut(max_chars: int, length: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    out = cut_middle(text, max_chars)
    if length <= max_chars:
        assert out == text
        return
    assert len(out) <= max_chars
    head, rest = out.split("\n[... ", 1)
    count, tail = rest.split(" characters cut ...]\n", 1)
    assert text.startswith(head) and text.endswith(tail)
    assert len(head) + int(count) + len(tail) == length  # nothing lost unaccounted


def test_the_head_share_decides_how_much_of_each_end_is_kept() -> None:
    text = "h" * 1000 + "t" * 1000
    out = cut_middle(text, 300, head_share=2 / 3)
    head, _, tail = out.partition("\n[... ")
    tail = tail.split("]\n", 1)[1]
    assert len(head) == pytest.approx(2 * len(tail), abs=1)


def test_a_limit_smaller_than_the_marker_still_keeps_both_ends() -> None:
    out = cut_middle("abcdefghijklmnopqrstuvwxyz" * 10, 5)
    assert out.startswith("a") and out.endswith("z") and "characters cut" in out


def test_observations_and_event_fields_are_cut_by_the_same_rule() -> None:
    text = "".join(f"line {i}\n" for i in range(10_000))
    assert cap(text, 500) == cut_middle(text, 500, head_share=2 / 3)
    data = bound({"stdout": text, "turn": 3}, max_chars=800)
    assert data == {"stdout": cut_middle(text, 800), "turn": 3, "truncated": ["stdout"]}


@pytest.mark.parametrize(
    ("value", "expected"), [(b"caf\xc3\xa9", "café"), ("café", "café"), (7, "7"), (1.5, "1.5")]
)
def test_text_of_decodes_bytes_as_utf8_and_str_s_the_rest(value: object, expected: str) -> None:
    assert text_of(value) == expected
