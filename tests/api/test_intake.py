"""Intake at scale against a real redis-server: all or nothing, refusal with 503 when Redis
is (nearly) full, errors listed by line, retention settings, bytes per queued task."""

from __future__ import annotations

import asyncio
import json
import time

import redis

from actfleet.benchscale import batch_lines, bytes_per_task
from store.api_store import ApiStore, connect
from store.intake import Intake, Submission
from store.keys import TASK_QUEUE, Keys
from store.staging import INTAKE_TTL_S
from tests.api.conftest import Fleet, spec


def jsonl(*specs: object) -> bytes:
    return b"".join(json.dumps(s).encode() + b"\n" for s in specs)


def typical_batch(n: int) -> bytes:
    return b"".join(batch_lines(n))


def squeeze(r: redis.Redis, headroom_bytes: int) -> None:
    """Let Redis grow only ``headroom_bytes`` more (``noeviction``)."""
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(used + headroom_bytes))


def nothing_of(fleet: Fleet, tenant: str = "acme") -> None:
    """No trace of any submission: no record, stream, message, index entry or slot."""
    r, k = fleet.redis, fleet.keys
    assert r.keys("t:*task:*") == [] and r.keys("t:*events:*") == []
    assert r.keys("t:*batch:*") == [] and r.keys("t:*intake:*") == []
    assert r.llen(TASK_QUEUE) == 0
    assert sum(int(r.zcard(k.queued(s))) for s in k.shard_ids) == 0
    assert r.zcard(k.tenant_tasks(tenant)) == 0
    assert int(r.get(k.tenant_active(tenant)) or 0) == 0


def wait_for(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_batch_that_fills_redis_half_way_queues_nothing_and_answers_503(make_fleet) -> None:  # type: ignore[no-untyped-def]
    # given an API that only refuses at the very limit, and a Redis with room for a few
    # hundred tasks when the batch brings 3,000
    fleet = make_fleet(redis_memory_high_fraction=1.0, max_batch_tasks=5000)
    with fleet.client() as c:
        squeeze(fleet.redis, 1 << 20)
        # when the batch is submitted
        r = c.post("/v1/batches", content=typical_batch(3000))
    # then it is refused as a whole, with a time to come back
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0
    assert "nothing was queued" in r.json()["detail"]["message"]
    # and nothing of it is left: not visible, not running, no slot taken
    nothing_of(fleet)


def test_near_its_limit_redis_refuses_new_work_keeps_what_it_accepted(make_fleet) -> None:  # type: ignore[no-untyped-def]
    # given a task accepted while Redis had room
    fleet = make_fleet()
    with fleet.client() as c:
        accepted = c.post("/v1/tasks", json=spec()).json()["id"]
        assert c.get("/readyz").json()["memory"]["accepting"] is True
        # when Redis gets above 90% of its maxmemory (with a megabyte or so to spare)
        for i in range(64):  # in small values: a large one inflates the query buffer too
            fleet.redis.set(f"filler:{i}", b"x" * (256 << 10))
        used = int(fleet.redis.info("memory")["used_memory"])
        fleet.redis.config_set("maxmemory-policy", "noeviction")
        fleet.redis.config_set("maxmemory", str(int(used / 0.93)))
        wait_for(lambda: c.get("/readyz").status_code == 503)
        ready = c.get("/readyz")
        task = c.post("/v1/tasks", json=spec())
        batch = c.post("/v1/batches", content=jsonl(spec(), spec()))
        # then readiness says it is full, and new tasks and batches get 503 + Retry-After
        assert ready.json()["status"] == "full"
        assert ready.json()["memory"]["accepting"] is False
        for refused in (task, batch):
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) > 0
        # and the task accepted before is intact: queued, with its message, and it can
        # still run to its end (Redis still has the room a worker needs)
        assert c.get(f"/v1/tasks/{accepted}").json()["status"] == "queued"
        assert fleet.redis.llen(TASK_QUEUE) == 1
        fleet.start_task(accepted)
        assert isinstance(fleet.finish(accepted), bytes)
        assert c.get(f"/v1/tasks/{accepted}").json()["status"] == "completed"


def test_a_submission_whose_api_died_before_commit_is_invisible_and_expires(
    redis_url: str,
) -> None:
    # given a batch staged by an API that died before its commit
    async def stage_only() -> Submission:
        client = connect(redis_url)
        keys = Keys("t")
        store = ApiStore(client, keys)
        from api.bodies import parse_batch, spec_rules
        from tests.api.conftest import fleet_settings

        specs = parse_batch(typical_batch(1500), 2000, spec_rules(fleet_settings(redis_url)))
        records = store.new_records("acme", specs, "batch_dead")
        sub = Submission("batch_dead", records, keys.batch_tasks("batch_dead"))
        await Intake(client, keys).stage(sub, 1)
        await client.aclose()
        return sub

    sub = asyncio.run(stage_only())
    r, k = redis.Redis.from_url(redis_url), Keys("t")
    # then no worker, sweeper or reader can find it: no message, no index entry, no batch
    assert r.llen(TASK_QUEUE) == 0
    assert sum(int(r.zcard(k.queued(s))) for s in k.shard_ids) == 0
    assert r.zcard(k.tenant_tasks("acme")) == 0
    assert not r.exists(k.batch("batch_dead"))
    assert r.keys("t:*events:*") == []
    # and every key it wrote goes away by itself
    staged = [k.batch_tasks("batch_dead"), k.intake_messages("batch_dead")]
    staged += [k.task(rec.id) for rec in sub.records]
    pipe = r.pipeline(transaction=False)
    for name in staged:
        pipe.ttl(name)
    assert all(0 < ttl <= INTAKE_TTL_S for ttl in pipe.execute())


def test_a_committed_batch_is_whole_and_kept(fleet: Fleet) -> None:
    with fleet.client() as c:
        r = c.post("/v1/batches", content=typical_batch(2500))
    assert r.status_code == 202
    k, red = fleet.keys, fleet.redis
    ids = [i.decode() for i in red.lrange(k.batch_tasks(r.json()["id"]), 0, -1)]
    assert len(ids) == 2500 and red.llen(TASK_QUEUE) == 2500
    assert sum(int(red.zcard(k.queued(s))) for s in k.shard_ids) == 2500
    assert red.zcard(k.tenant_tasks("acme")) == 2500
    assert red.keys("t:intake:*") == []
    # records of queued tasks do not expire (their streams begin when they start)
    pipe = red.pipeline(transaction=False)
    for task_id in ids[::250]:
        pipe.ttl(k.task(task_id))
    assert set(pipe.execute()) == {-1}
    # and the messages come out in input order
    first = json.loads(red.lindex(TASK_QUEUE, -1))  # type: ignore[arg-type]
    import base64

    assert json.loads(base64.b64decode(first["body"]))[0] == [ids[0]]


def test_many_bad_lines_are_listed_up_to_the_cap_and_all_counted(fleet: Fleet) -> None:
    body = jsonl(*([spec()] * 10 + [{"prompt": 3}] * 150))
    with fleet.client() as c:
        r = c.post("/v1/batches", content=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["invalid_lines"] == 150
    assert len(detail["errors"]) == 100
    assert detail["errors"][0] == {
        "line": 11,
        "problems": ["prompt: expected a string, got a number"],
    }
    assert "150 of 160 lines are invalid" in detail["message"]
    assert "the first 100 are listed" in detail["message"]
    nothing_of(fleet)


def test_retention_settings_set_the_ttls_of_finished_tasks_and_batches(make_fleet) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(record_retention_s=1234, stream_retention_s=600)
    with fleet.client() as c:
        batch = c.post("/v1/batches", content=jsonl(spec(), spec())).json()
        ids = [i.decode() for i in fleet.redis.lrange(fleet.keys.batch_tasks(batch["id"]), 0, -1)]
        # when one task finishes by a worker and the other is cancelled by the API
        fleet.start_task(ids[0])
        fleet.finish(ids[0])
        assert c.post(f"/v1/tasks/{ids[1]}/cancel").status_code == 202
    r, k = fleet.redis, fleet.keys
    # then the API's finish keeps the record and stream as long as the settings say
    assert 1200 < r.ttl(k.task(ids[1])) <= 1234
    assert 570 < r.ttl(k.events(ids[1])) <= 600
    # and the batch outlives its records
    assert 2400 < r.ttl(k.batch(batch["id"])) <= 2468
    assert 2400 < r.ttl(k.batch_tasks(batch["id"])) <= 2468


def test_a_typical_queued_task_costs_at_most_3_kb_of_redis(fleet: Fleet) -> None:
    n = 1000
    with fleet.client() as c:
        r = c.post("/v1/batches", content=typical_batch(n))
    assert r.status_code == 202
    red, k = fleet.redis, fleet.keys
    ids = [i.decode() for i in red.lrange(k.batch_tasks(r.json()["id"]), 0, -1)]
    own = [
        [
            int(red.memory_usage(k.task(i), samples=0) or 0),
            int(red.memory_usage(k.events(i), samples=0) or 0),  # none while it waits
        ]
        for i in ids[::50]
    ]
    shared = [
        int(red.memory_usage(name, samples=0) or 0)
        for name in (
            k.tenant_tasks("acme"),
            *(k.queued(s) for s in k.shard_ids),
            *(k.batch_counts(r.json()["id"], s) for s in k.shard_ids),
            k.batch_tasks(r.json()["id"]),
            TASK_QUEUE,
        )
    ]
    assert bytes_per_task(own, shared, n) <= 3 * 1024


def test_a_batch_line_nested_past_the_limit_is_refused_naming_it(fleet: Fleet) -> None:
    deep: object = "leaf"
    for _ in range(40):
        deep = [deep]
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(spec(), spec(expected={"answer": deep})))
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]["errors"]
    assert error["line"] == 2 and "nested deeper than 32 levels" in error["problems"][0]
    nothing_of(fleet)


def _batch_submission(redis_url: str, n: int, batch_id: str, webhook: bool) -> Submission:
    from api.bodies import parse_batch, spec_rules
    from tests.api.conftest import fleet_settings

    keys = Keys("t")
    store = ApiStore(connect(redis_url), keys)
    specs = parse_batch(typical_batch(n), 5000, spec_rules(fleet_settings(redis_url)))
    records = store.new_records("acme", specs, batch_id)
    fields = {"id": batch_id, "tenant": "acme", "total": str(n)}
    if webhook:
        fields["webhook_url"] = "http://127.0.0.1:9/hook"
    return Submission(
        batch_id, records, keys.batch_tasks(batch_id), 3600, batch=(keys.batch(batch_id), fields)
    )


def _counts(r: redis.Redis, k: Keys, batch_id: str) -> dict[str, int]:
    from store.batches import sum_counters

    return sum_counters(r.hgetall(k.batch_counts(batch_id, s)) for s in k.shard_ids)


def test_the_commit_counts_a_batch_per_shard_on_one_redis_and_per_shard_with_its_own_broker(
    redis_url: str,
) -> None:
    # given the same batch of 1,200 tasks committed by the single script (broker on the
    # store's Redis) and, as on a cluster, one script per shard (broker on its own client)
    r, k = redis.Redis.from_url(redis_url), Keys("t")

    async def run(batch_id: str, own_broker: bool) -> Submission:
        client = connect(redis_url)
        broker = connect(redis_url) if own_broker else None
        intake = Intake(client, k, broker=broker)
        assert intake.per_shard is own_broker
        sub = _batch_submission(redis_url, 1200, batch_id, webhook=True)
        await intake.stage(sub, 7)
        await intake.commit(sub, 7)
        await client.aclose()
        return sub

    for batch_id, own in (("batch_one", False), ("batch_sharded", True)):
        sub = asyncio.run(run(batch_id, own))
        # then its counters say every task is queued, summed over the shards it fell in
        counts = _counts(r, k, batch_id)
        assert counts["queued"] == counts["total"] == 1200
        shards = {k.shard(rec.id) for rec in sub.records}
        assert len(shards) == k.shards
        for s in shards:
            assert r.hget(k.batch_counts(batch_id, s), "webhook") == b"1"
            assert r.ttl(k.batch_counts(batch_id, s)) > 0
        # and every task is in its own shard's queued index, its record kept
        assert all(r.zscore(k.queued(k.shard(t.id)), t.id) == 7 for t in sub.records)
        assert {r.ttl(k.task(t.id)) for t in sub.records[::100]} == {-1}
        assert r.exists(k.batch(batch_id)) and r.llen(k.batch_tasks(batch_id)) == 1200
    # and the messages name their batch, in input order, both ways
    messages = [json.loads(m) for m in r.lrange(TASK_QUEUE, 0, -1)]
    import base64

    bodies = [json.loads(base64.b64decode(m["body"])) for m in reversed(messages)]
    assert [b[1]["batch_id"] for b in bodies] == ["batch_one"] * 1200 + ["batch_sharded"] * 1200
    assert r.keys("t:*intake:*") == []


def test_a_per_shard_commit_whose_broker_push_fails_leaves_nothing(redis_url: str) -> None:
    # given the queue on a Redis that does not answer, and a batch committed shard by shard
    r, k = redis.Redis.from_url(redis_url), Keys("t")

    async def run() -> Submission:
        client = connect(redis_url)
        intake = Intake(client, k, broker=connect("redis://127.0.0.1:1/0"))
        sub = _batch_submission(redis_url, 600, "batch_lost", webhook=False)
        await intake.stage(sub, 7)
        try:
            await intake.commit(sub, 7)
        except redis.RedisError:
            assert await intake.committed(sub) is False
            await intake.discard(sub)
        else:
            raise AssertionError("the commit went through without its broker")
        await client.aclose()
        return sub

    asyncio.run(run())
    # then every shard it had committed was taken back: no record, index entry or count
    assert r.keys("t:*task:*") == [] and r.keys("t:*batch:*") == []
    assert sum(int(r.zcard(k.queued(s))) for s in k.shard_ids) == 0
    assert r.zcard(k.tenant_tasks("acme")) == 0 and r.llen(TASK_QUEUE) == 0


def _queued_ids(r: redis.Redis) -> list[str]:
    """The task ids of the broker queue's messages, in the order workers take them."""
    import base64

    out = []
    for raw in reversed(r.lrange(TASK_QUEUE, 0, -1)):  # consumers pop from the tail
        message = json.loads(raw)
        out.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return out


def test_a_batch_onto_a_waiting_queue_queues_after_it_in_input_order(fleet: Fleet) -> None:
    # given tasks already waiting in the broker queue
    with fleet.client() as c:
        first = c.post("/v1/batches", content=typical_batch(1500)).json()["id"]
        # when another batch arrives (moved onto the busy queue, not renamed onto an empty one)
        second = c.post("/v1/batches", content=typical_batch(2500)).json()["id"]
    r, k = fleet.redis, fleet.keys
    ids = [[i.decode() for i in r.lrange(k.batch_tasks(b), 0, -1)] for b in (first, second)]
    # then workers take the first batch's tasks, then the second's, each in input order
    assert _queued_ids(r) == ids[0] + ids[1]
    # and the queue is kept (the staged messages' TTL did not come with them)
    assert r.ttl(TASK_QUEUE) == -1
    assert r.keys("t:intake:*") == []


def test_bad_lines_late_in_a_big_batch_leave_nothing_staged_or_queued(fleet: Fleet) -> None:
    # given a 6,000-line batch whose lines 5,500 (a bad field) and 5,900 (a custom_id used
    # before) are wrong, read while its first thousands of tasks are already being staged
    lines = [json.loads(line) for line in batch_lines(6000)]
    lines[5499]["limits"] = {"max_turns": 0}
    lines[5899]["custom_id"] = lines[10]["custom_id"]
    fleet.redis.config_resetstat()
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(*lines))
    # then both are reported by line, with the usual messages, and nothing was queued
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["errors"] == [
        {"line": 5500, "problems": ["limits.max_turns: must be between 1 and 200, got 0"]},
        {
            "line": 5900,
            "problems": [
                "custom_id: 'task-0000010' is also used on line 11; custom_ids must be "
                "unique in a batch"
            ],
        },
    ]
    assert "2 of 6000 lines are invalid; nothing was queued" in detail["message"]
    # and what was staged before the bad line was read is gone
    staged = fleet.redis.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)
    assert staged >= 5  # chunks of the first 5,499 lines went to Redis as they were read
    nothing_of(fleet)


def test_a_client_that_goes_away_mid_batch_leaves_nothing_staged(fleet: Fleet) -> None:
    import socket
    from urllib.parse import urlsplit

    # given a client that sends the first 4,000 lines of a 10,000-line batch, which the
    # API stages as it reads them, and then hangs up
    body = typical_batch(10_000)
    sent = b"".join(batch_lines(4000))
    url = urlsplit(fleet.url)
    head = (
        f"POST /v1/batches HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Authorization: Bearer {fleet.key_for('acme')}\r\n"
        f"Content-Type: application/x-ndjson\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    fleet.redis.config_resetstat()
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head + sent)
        wait_for(
            lambda: fleet.redis.info("commandstats").get("cmdstat_eval", {}).get("calls", 0) >= 3
        )
    # then what it staged is taken back: nothing is left, queued or visible
    wait_for(lambda: fleet.redis.keys("t:*task:*") == [])
    nothing_of(fleet)
