"""The lull executor: calls wait for a pause in submissions, or for their maximum wait."""

from __future__ import annotations

import threading
import time

import pytest

from workers.lull import LullExecutor


class Calls:
    def __init__(self) -> None:
        self.at: list[float] = []
        self.lock = threading.Lock()

    def record(self) -> None:
        with self.lock:
            self.at.append(time.monotonic())


def test_calls_wait_for_the_pause_after_a_burst_of_submissions() -> None:
    # Given an executor that waits for 0.2 s without submissions
    lull, calls = LullExecutor(2, quiet_s=0.2, max_wait_s=5.0), Calls()
    try:
        # When ten calls are submitted 30 ms apart
        for _ in range(10):
            lull.submit(calls.record)
            time.sleep(0.03)
        last = time.monotonic()
        lull.submit(lambda: None).result(timeout=5)
        # Then none ran during the burst, and all ran once it paused
        assert len(calls.at) == 10
        assert min(calls.at) >= last + 0.19
    finally:
        lull.shutdown()


def test_under_steady_demand_a_call_runs_after_its_maximum_wait() -> None:
    # Given an executor that would wait for 0.2 s of quiet, but at most 0.4 s
    lull, calls = LullExecutor(1, quiet_s=0.2, max_wait_s=0.4), Calls()
    try:
        # When calls keep coming every 50 ms for 1.2 s (no pause at all)
        first = time.monotonic()
        lull.submit(calls.record)
        while time.monotonic() - first < 1.2:
            time.sleep(0.05)
            lull.submit(lambda: None)
        # Then the first call ran after about its maximum wait, in the middle of the stream
        assert calls.at, "the first call never ran while submissions went on"
        assert first + 0.39 <= calls.at[0] < first + 1.0
    finally:
        lull.shutdown()


def test_shutdown_runs_what_is_queued_at_once_and_waits_for_it() -> None:
    # Given calls queued on an executor that would wait 60 s for a lull
    lull, calls = LullExecutor(2, quiet_s=60.0, max_wait_s=60.0), Calls()
    for _ in range(3):
        lull.submit(calls.record)
    # When it shuts down
    started = time.monotonic()
    lull.shutdown(wait=True)
    # Then every call has run, without waiting for the lull, and no more are taken
    assert len(calls.at) == 3
    assert time.monotonic() - started < 5
    with pytest.raises(RuntimeError):
        lull.submit(calls.record)


def test_a_failing_call_shows_on_its_future_and_the_rest_still_run() -> None:
    lull, calls = LullExecutor(1, quiet_s=0.0, max_wait_s=0.0), Calls()

    def boom() -> None:
        raise OSError("gone")

    failed = lull.submit(boom)
    ok = lull.submit(calls.record)
    with pytest.raises(OSError, match="gone"):
        failed.result(timeout=5)
    ok.result(timeout=5)
    assert len(calls.at) == 1
    lull.shutdown()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LullExecutor(0)
    with pytest.raises(ValueError):
        LullExecutor(1, quiet_s=1.0, max_wait_s=0.5)
