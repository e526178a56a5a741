"""The standing chaos suite: Redis outages longer than every reconnect window, lost broker
messages, workers killed, stopped and restarted mid-batch. After each, every task ends
exactly once (one ``task.finished``, no step twice), and the workers and the API recover
by themselves. Real processes throughout (``tests/e2e/fleet.py``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.e2e.fleet import Fleet, assert_each_ran_exactly_once

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_server, tmp_path)
    yield f
    f.close()


def test_a_worker_whose_tasks_end_while_redis_is_down_consumes_again_after_it_returns(
    fleet: Fleet,
) -> None:
    # given one worker with every slot busy, whose store gives up on Redis after 3 s
    worker = fleet.start_worker(concurrency=2, ACTFLEET_REDIS_PATIENCE_S="3")
    ids = fleet.submit(6)
    fleet.wait_mid_task(worker.pid, n=2)

    # when Redis dies for longer than that patience, so both tasks end (unacknowledged,
    # the broker being gone) during the outage, and then comes back
    fleet.server.kill()
    time.sleep(12)
    fleet.server.start()

    # then the worker's consumer takes messages again: every task finishes exactly once
    fleet.wait_all_terminal(ids, timeout_s=150)
    assert_each_ran_exactly_once(fleet, ids)
    assert worker.poll() is None
