"""A batch line read by orjson (``api.bodies.quick_loads``) is read as the strict reader
reads it, or left to that reader: duplicate keys, large integers and refused JSON keep
their messages."""

from __future__ import annotations

import json
import random

import pytest

from api.bodies import NOT_QUICK, BatchParser, JSONRefused, loads, quick_loads, spec_rules
from api.errors import ApiError
from config.settings import Settings

LINES = [
    b'{"prompt":"Task 1: compute 7 * 6","custom_id":"task-0000001","limits":{"max_turns":4}}',
    b'{"prompt":"a","prompt":"b"}',  # a key twice
    b'{"prompt":"a:b", "prompt" :"c"}',  # twice, with a ':' in a string and a space
    b'{"prompt":"x","metadata":{"a":"1","a":"2"}}',  # twice, nested
    b'{"a":{"b:c":1},"a":{"d":2}}',  # twice, the first holding a ':' key
    b'{"prompt":"x","expected":{"answer":18446744073709551616}}',  # beyond 64 bits
    b'{"prompt":"x","expected":{"answer":-9223372036854775809}}',
    b'{"prompt":"x","expected":{"answer":9223372036854775807}}',
    b'{"prompt":"x","expected":{"answer":1e19}}',
    b'{"prompt":"x","expected":{"answer":1e400}}',  # not finite
    b'{"prompt":"x","expected":{"answer":NaN}}',
    b'{"prompt":"x","llm":{"temperature":0.1000000000000000055511151231257827}}',
    b'{"prompt":"x" "y"}',
    b'{"prompt":"\xc3\xa9\xe4\xb8\xad:"}',
    b'{"prompt":"x\\"y:z","custom_id":"a:b"}',
    b'{"prompt":"x\\ty","tools":[{"name":"f"},{"name":"g"}]}',
    b'{"prompt":"x"}  ',
    b'[1,2,{"a":"b"}]',
    b'"just a string"',
    b'{"prompt":"x",}',
]


def strict(line: bytes) -> object:
    try:
        return ("ok", loads(line.decode()))
    except (json.JSONDecodeError, JSONRefused) as e:
        return ("refused", type(e).__name__)


@pytest.mark.parametrize("line", LINES)
def test_a_quick_read_is_the_strict_read_or_none(line: bytes) -> None:
    quick = quick_loads(line)
    if quick is NOT_QUICK:
        return
    kind, want = strict(line)  # type: ignore[misc]
    assert kind == "ok"
    assert json.dumps(quick) == json.dumps(want)  # same values, same int/float types


def test_lines_that_differ_are_left_to_the_strict_reader() -> None:
    for line in LINES[1:7] + LINES[9:11] + LINES[12:13] + LINES[19:]:
        assert quick_loads(line) is NOT_QUICK, line
    assert quick_loads(LINES[0]) is not NOT_QUICK  # and the common line is read quickly


def test_random_lines_with_repeated_keys_never_pass_quickly() -> None:
    rng = random.Random(3)
    words = ["a", "b", "a:b", ":", "x y", ""]
    for _ in range(5000):
        pairs = [
            (rng.choice(words), rng.choice([*words, 1, 2.5])) for _ in range(rng.randint(1, 5))
        ]
        body = ",".join(
            f"{json.dumps(k)}{rng.choice(['', ' '])}:{rng.choice(['', ' '])}{json.dumps(v)}"
            for k, v in pairs
        )
        line = ("{" + body + "}").encode()
        quick = quick_loads(line)
        if quick is not NOT_QUICK:
            assert strict(line) == ("ok", quick), line


def test_a_batch_reports_the_same_problems_either_way() -> None:
    parser = BatchParser(100, spec_rules(Settings()))
    parser.feed(b"\n".join([LINES[0], LINES[1], LINES[5], LINES[9], LINES[12]]) + b"\n")
    with pytest.raises(ApiError) as info:
        parser.finish()
    errors = info.value.detail["errors"]
    assert [e["line"] for e in errors] == [2, 4, 5]
    assert errors[0]["problems"] == [
        "not acceptable JSON: the key 'prompt' appears twice in one object"
    ]
    assert errors[1]["problems"][0].startswith("not acceptable JSON: the number 1e400")
    assert errors[2]["problems"][0].startswith("not valid JSON:")


def test_an_integer_beyond_64_bits_stays_an_integer() -> None:
    parser = BatchParser(100, spec_rules(Settings()))
    parser.feed(LINES[0] + b"\n" + LINES[5] + b"\n")
    [_, spec] = parser.finish()
    assert spec.expected is not None and spec.expected.answer == 2**64


@pytest.mark.parametrize("depth", [900, 995, 1000, 1010, 1023, 1024, 1100])
def test_deep_nesting_near_the_limits_is_the_strict_readers_answer(depth: int) -> None:
    """orjson reads up to 1024 levels, more than Python's recursion limit: the quick path
    must not blow the stack where orjson succeeds (it would be a 500), it hands over."""
    line = b'{"prompt":"x","metadata":{"k":' + b"[" * depth + b"]" * depth + b"}}"
    quick = quick_loads(line)
    if quick is not NOT_QUICK:
        assert quick == loads(line.decode())
