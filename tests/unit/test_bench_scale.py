"""The arithmetic of ``actfleet bench scale``."""

from __future__ import annotations

import argparse
import json

import pytest

from actfleet.benchscale import batch_lines, bytes_per_task, p50_p95_ms, rate, typical_spec
from actfleet.cli.bench import _sizes
from agent.models import TaskSpec


def test_bytes_per_task_adds_a_tasks_own_keys_to_its_share_of_the_shared_ones() -> None:
    # two sampled tasks own 1000 + 500 and 1200 + 300 bytes; 4 tasks share 400 + 4000
    own = [[1000, 500], [1200, 300]]
    assert bytes_per_task(own, [400, 4000], 4) == 1500 + 1100


def test_bytes_per_task_without_samples_is_zero() -> None:
    assert bytes_per_task([], [100], 10) == 0.0
    assert bytes_per_task([[1]], [100], 0) == 0.0


def test_rate_is_tasks_per_second() -> None:
    assert rate(10_000, 0.5) == 20_000.0
    assert rate(10, 0.0) == 0.0


def test_poll_percentiles_are_milliseconds_interpolated() -> None:
    assert p50_p95_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == {"p50": 3.0, "p95": 4.8}
    assert p50_p95_ms([]) == {"p50": None, "p95": None}


def test_the_bench_batch_is_valid_distinct_jsonl() -> None:
    lines = list(batch_lines(3))
    assert all(line.endswith(b"\n") for line in lines)
    specs = [TaskSpec.from_dict(json.loads(line)) for line in lines]
    assert len({s.custom_id for s in specs}) == 3
    assert specs[1] == TaskSpec.from_dict(typical_spec(1))


def test_sizes_are_a_comma_separated_list_of_positive_numbers() -> None:
    assert _sizes("1000,10000, 100000") == [1000, 10000, 100000]
    for bad in ("", "0,10", "ten", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            _sizes(bad)
