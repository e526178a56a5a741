"""``actfleet bench scale`` end to end, at tiny sizes: its own Redis and API, no workers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("cluster", [[], ["--cluster", "3"]], ids=["one-redis", "cluster"])
def test_bench_scale_reports_intake_polls_and_bytes_per_size_as_json(cluster: list[str]) -> None:
    # when the bench runs at two tiny sizes (on one Redis, or on a cluster on loopback)
    command = ["bench", "scale", "--sizes", "20,50", "--polls", "3", "--json", *cluster]
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
        # and Redis' CPU for it is measured, on every server and on the busiest one
        cpu = fig["intake_redis_cpu"]
        assert 0 < cpu["busiest_us_per_task"] <= cpu["total_us_per_task"]
    if cluster:  # the work spread over 3 masters and the broker: none did it all
        assert report["redis"] == "cluster of 3 masters"
        assert cpu["busiest_us_per_task"] < cpu["total_us_per_task"]
    else:
        assert report["redis"] == "one Redis"
        assert cpu["busiest_us_per_task"] == cpu["total_us_per_task"]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sizes", "0,10"], "sizes must be at least 1"), (["--cluster", "2"], "at least 3")],
)
def test_bench_scale_refuses_bad_arguments_with_a_message(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "actfleet", "bench", "scale", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
