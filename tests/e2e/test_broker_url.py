"""``ACTFLEET_BROKER_URL``: the task queue on its own Redis, records and streams on
``ACTFLEET_REDIS_URL``'s. Real API and worker processes (``tests/e2e/fleet.py``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from store import keys
from tests.conftest import RedisServer
from tests.e2e.fleet import Fleet, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "broker").start()
    yield server
    server.stop()


def test_a_batch_runs_with_its_messages_on_the_broker_and_its_state_on_the_store(
    redis_server: RedisServer, broker: RedisServer, tmp_path: Path
) -> None:
    # given the API and a worker whose queue lives on a Redis of its own
    fleet = Fleet(redis_server, tmp_path, ACTFLEET_BROKER_URL=broker.url)
    try:
        fleet.start_api()
        fleet.start_worker(concurrency=2)
        lines = [
            json.dumps({"prompt": f"count #{i}", "expected": {"answer": "3"}}) for i in range(4)
        ]
        with fleet.api_client() as c:
            # when a batch is submitted and runs
            batch_id = c.post("/v1/batches", content="\n".join(lines)).json()["id"]
            wait_for(lambda: c.get(f"/v1/batches/{batch_id}").json()["status"] == "finished", 120)
            status = c.get(f"/v1/batches/{batch_id}").json()
            ready = c.get("/readyz").json()
    finally:
        fleet.close()
    # then every task completed, the messages went through the broker, not the store
    assert status["counts"]["completed"] == 4 and status["success_rate"] == 1.0
    assert ready["status"] == "ok" and ready["queue"]["depth"] == 0
    store, queue = fleet.store.r, redis.Redis.from_url(broker.url)
    kombu = (b"_kombu", b"unacked", keys.TASK_QUEUE.encode())
    assert not [k for k in store.keys("*") if k.startswith(kombu)]
    assert any(k.startswith(b"_kombu") for k in queue.keys("*"))  # kombu's bookkeeping lives there
    assert not queue.keys("af:*")  # and no record or stream
