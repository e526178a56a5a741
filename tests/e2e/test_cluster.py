"""The service on a three-master Redis Cluster (records and streams) with the task queue on
a plain Redis of its own: a batch runs to the end, an SSE tail, a batch status, a cancel.
Real processes (``tests/e2e/fleet.py``); the cluster is started here on loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from actfleet.rediscluster import LocalCluster
from store.clients import sync_client
from store.keys import Keys
from store.worker_store import WorkerStore
from tests.conftest import RedisServer
from tests.e2e.fleet import Fleet, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
    pytest.mark.skipif(shutil.which("redis-cli") is None, reason="needs redis-cli"),
]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster")
    yield c
    c.stop()


def test_the_service_runs_on_a_three_master_cluster(
    cluster: LocalCluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    # given the API and a worker on the cluster, their queue on a plain Redis
    fleet = Fleet(redis_server, tmp_path)
    fleet.env.update(ACTFLEET_REDIS_URL=cluster.url, ACTFLEET_BROKER_URL=redis_server.url)
    fleet.store = WorkerStore(sync_client(cluster.url), Keys("af"))
    try:
        fleet.start_api()
        fleet.start_worker(concurrency=3)
        lines = [
            json.dumps({"prompt": f"count #{i}", "expected": {"answer": "3"}}) for i in range(6)
        ]
        with fleet.api_client() as c:
            # when a batch runs to the end
            batch_id = c.post("/v1/batches", content="\n".join(lines)).json()["id"]
            wait_for(lambda: c.get(f"/v1/batches/{batch_id}").json()["status"] == "finished", 180)
            status = c.get(f"/v1/batches/{batch_id}").json()
            rows = [json.loads(x) for x in c.get(f"/v1/batches/{batch_id}/results").text.split()]
            # and a client tails one task's events
            with c.stream("GET", f"/v1/tasks/{rows[0]['task_id']}/events") as sse:
                tail = [line for line in sse.iter_lines() if line.startswith("event:")]
            # and a task that would run for minutes is cancelled while it runs
            sleepy = c.post("/v1/tasks", json={"prompt": "sleepy"}).json()["id"]
            wait_for(lambda: c.get(f"/v1/tasks/{sleepy}").json()["status"] == "running", 60)
            assert c.post(f"/v1/tasks/{sleepy}/cancel").status_code == 202
            wait_for(lambda: c.get(f"/v1/tasks/{sleepy}").json()["status"] == "cancelled", 60)
            ready = c.get("/readyz").json()
    finally:
        fleet.close()

    # then every task answered, the status adds up, the stream ran to its end
    assert status["counts"]["completed"] == 6 and status["finished"] == 6
    assert status["success_rate"] == 1.0
    assert sorted(r["answer"] for r in rows) == ["3"] * 6
    assert tail[0] == "event: task.queued" and tail[-1] == "event: task.finished"
    assert ready["status"] == "ok", ready
    # and the state is spread over every master (a task's keys share one slot)
    assert all(n > 0 for n in cluster.keys_per_master()), cluster.keys_per_master()
    assert not redis.Redis.from_url(redis_server.url).keys("af:{*")
