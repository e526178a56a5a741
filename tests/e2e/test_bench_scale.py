"""``actfleet bench scale`` end to end, at tiny sizes: its own Redis and API, no workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_bench_scale_reports_intake_polls_and_bytes_per_size_as_json() -> None:
    # when the bench runs at two tiny sizes
    command = ["bench", "scale", "--sizes", "20,50", "--polls", "3", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "actfleet", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # then each size has its figures
    assert list(report["sizes"]) == ["20", "50"]
    for size, fig in report["sizes"].items():
        assert fig["tasks"] == int(size)
        assert fig["intake_tasks_per_s"] > 0 and fig["intake_s"] > 0
        assert 0 < fig["status_poll_ms"]["p50"] <= fig["status_poll_ms"]["p95"]
        # every task of the batch was queued, and costs what a queued task costs
        assert 500 < fig["bytes_per_task"] <= 3 * 1024
        assert fig["used_memory_per_task"] > 0


def test_bench_scale_refuses_bad_sizes_with_a_message() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "actfleet", "bench", "scale", "--sizes", "0,10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "sizes must be at least 1" in out.stderr and "Traceback" not in out.stderr
