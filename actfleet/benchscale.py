"""``actfleet bench scale``: intake rate, status-poll latency and Redis bytes per queued task,
through the real API on its own Redis, with no workers (only the API and Redis work).

For each batch size N (``sizes``), on an emptied Redis: one ``POST /v1/batches`` of N
typical task specs (``typical_spec``), timed from the first byte sent to the answer
(``intake_tasks_per_s`` = N / that time); then ``polls`` sequential ``GET
/v1/batches/{id}`` (p50/p95 in ms); then Redis memory per queued task, two ways:

* ``bytes_per_task``: ``MEMORY USAGE`` of the keys one task creates (its record, its event
  stream; sampled over ``SAMPLE`` tasks), plus its share of the keys the tasks share (the
  tenant index, the queued index, the batch's task list, the broker queue with the task's
  message), each share the key's size divided by N;
* ``used_memory_per_task``: the growth of ``INFO memory`` ``used_memory`` divided by N (it
  also counts Redis' own bookkeeping per key, and allocator slack).

``intake_redis_cpu`` is the CPU Redis spent on the intake (``INFO cpu``), in µs per task:
all servers together and the busiest one. One Redis runs commands on one core, so
1e6 / ``busiest_us_per_task`` is the most tasks per second any number of API processes
could queue through it: the figure that says how far one Redis goes.

``cluster`` = M (``--cluster M``) runs the same on an M-master Redis Cluster on loopback
(``actfleet.rediscluster``), with the task queue on a Redis of its own
(``ACTFLEET_BROKER_URL``), as deploy/README.md describes: memory is summed over the
servers, and the busiest server's CPU shows what spreading the keys bought.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from actfleet.benchfleet import percentile
from actfleet.rediscluster import LocalCluster
from actfleet.stack import LocalStack, RedisServer
from store.apikeys import create_key
from store.clients import sync_client
from store.keys import TASK_QUEUE, Keys

DEFAULT_SIZES = (1_000, 10_000, 100_000)
DEFAULT_POLLS = 20
SAMPLE = 200  # tasks whose own keys are measured
KEY_PREFIX = "af"


def typical_spec(i: int) -> dict[str, Any]:
    """One line of the bench's batch: what an evaluation run sends (a prompt, an id, a turn
    limit and an answer to grade against)."""
    return {
        "prompt": f"Task {i}: compute {i} * 7 and answer with the number only.",
        "custom_id": f"task-{i:07d}",
        "limits": {"max_turns": 4},
        "expected": {"answer": str(i * 7), "grader": "numeric"},
    }


def batch_lines(n: int, spec: Callable[[int], dict[str, Any]] = typical_spec) -> Iterator[bytes]:
    for i in range(n):
        yield json.dumps(spec(i), separators=(",", ":")).encode() + b"\n"


def p50_p95_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50 and p95 of ``seconds``, in milliseconds (None without samples)."""
    if not seconds:
        return {"p50": None, "p95": None}
    return {
        "p50": round(percentile(list(seconds), 0.5) * 1000, 2),
        "p95": round(percentile(list(seconds), 0.95) * 1000, 2),
    }


def rate(n: int, seconds: float) -> float:
    """Tasks per second (0 when no time was measured)."""
    return round(n / seconds, 1) if seconds > 0 else 0.0


def bytes_per_task(own: Iterable[Sequence[int]], shared: Iterable[int], n: int) -> float:
    """Mean bytes of the keys a task owns (one sequence of key sizes per sampled task)
    plus each shared key's size split over the ``n`` tasks that share it."""
    sampled = [sum(sizes) for sizes in own]
    if not sampled or n < 1:
        return 0.0
    return round(sum(sampled) / len(sampled) + sum(shared) / n, 1)


@dataclass(frozen=True, slots=True)
class Redises:
    """Where the bench reads: ``state`` (records, streams, indexes: one Redis or a cluster
    client), ``nodes`` (a plain client per server holding that state) and ``broker`` (the
    task queue's Redis: the one Redis, or its own beside a cluster)."""

    state: redis.Redis
    nodes: list[redis.Redis]
    broker: redis.Redis

    def flush(self) -> None:
        for client in self.servers():
            client.flushall()

    def servers(self) -> list[redis.Redis]:
        """Every server once: the state's, then the broker's unless it is one of them."""
        return self.nodes + ([] if any(self.broker is c for c in self.nodes) else [self.broker])

    def close(self) -> None:
        for client in [self.state, *self.servers()]:
            client.close()


def run_scale_bench(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    polls: int = DEFAULT_POLLS,
    cluster: int = 0,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Start Redis and the API (no workers), then measure each size; see the module doc.
    With ``cluster`` = M >= 3, records and streams live on an M-master Redis Cluster on
    loopback and the task queue on a Redis of its own (``ACTFLEET_BROKER_URL``)."""
    if not sizes or min(sizes) < 1 or polls < 1:
        raise ValueError("sizes must be >= 1 and polls >= 1")
    if cluster and cluster < 3:
        raise ValueError("a Redis Cluster needs at least 3 masters")
    say = progress or (lambda _msg: None)
    largest = max(sizes)
    stack_env = {
        "ACTFLEET_LOG_LEVEL": "WARNING",
        "ACTFLEET_KEY_PREFIX": KEY_PREFIX,
        "ACTFLEET_MAX_BATCH_TASKS": str(largest),
        "ACTFLEET_MAX_ACTIVE_PER_TENANT": str(largest),
        "ACTFLEET_MAX_REQUEST_BYTES": str(max(64 << 20, largest * 1024)),
        **(env or {}),
    }
    keys = Keys(KEY_PREFIX)
    out: dict[str, Any] = {"redis": f"cluster of {cluster} masters" if cluster else "one Redis"}
    out["sizes"] = {}
    with contextlib.ExitStack() as stack_of:
        tmp = Path(stack_of.enter_context(tempfile.TemporaryDirectory(prefix="actfleet-bench-")))
        redis_url = None
        if cluster:
            say(f"starting a Redis Cluster of {cluster} masters and a broker Redis")
            nodes = LocalCluster(tmp / "cluster", cluster)
            stack_of.callback(nodes.stop)
            broker = RedisServer(tmp / "broker").start()
            stack_of.callback(broker.stop)
            redis_url = nodes.url
            stack_env["ACTFLEET_BROKER_URL"] = broker.url
        stack = stack_of.enter_context(
            LocalStack(redis_url=redis_url, workers=0, env=stack_env, state_dir=tmp / "stack")
        )
        assert stack.redis_url is not None
        if cluster:
            rs = Redises(
                sync_client(nodes.url),
                [LocalCluster.node(p) for p in nodes.ports],
                redis.Redis.from_url(broker.url),
            )
        else:
            one = redis.Redis.from_url(stack.redis_url)
            rs = Redises(one, [one], one)
        stack_of.callback(rs.close)
        for n in sizes:
            say(f"batch of {n} tasks")
            out["sizes"][str(n)] = _one_size(stack.api_url, rs, keys, n, polls)
    return out


def _cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_cpu(before: Sequence[float], after: Sequence[float], n: int) -> dict[str, float]:
    """Redis CPU per task in µs: all servers together, and the busiest one (what bounds the
    rate: one server uses one core)."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return {
        "total_us_per_task": round(sum(spent) / n * 1e6, 1),
        "busiest_us_per_task": round(max(spent) / n * 1e6, 1),
    }


def _one_size(api_url: str, rs: Redises, keys: Keys, n: int, polls: int) -> dict[str, Any]:
    rs.flush()
    r = rs.state
    api_key, _ = create_key(r, keys, "bench", "bench scale")
    servers = rs.servers()
    before = sum(int(c.info("memory")["used_memory"]) for c in servers)
    body = b"".join(batch_lines(n))
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=600
    ) as http:
        cpu_before = [_cpu_s(c) for c in servers]
        t0 = time.perf_counter()
        resp = http.post(
            "/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        intake_s = time.perf_counter() - t0
        cpu_after = [_cpu_s(c) for c in servers]
        if resp.status_code != 202:
            raise RuntimeError(f"the API refused the batch: {resp.status_code} {resp.text[:500]}")
        batch_id = resp.json()["id"]
        poll_s = []
        for _ in range(polls):
            t = time.perf_counter()
            status = http.get(f"/v1/batches/{batch_id}")
            poll_s.append(time.perf_counter() - t)
            status.raise_for_status()
    after = sum(int(c.info("memory")["used_memory"]) for c in servers)
    ids = [i.decode() for i in r.lrange(keys.batch_tasks(batch_id), 0, -1)]  # type: ignore[union-attr]
    sample = random.Random(n).sample(ids, min(SAMPLE, len(ids)))
    own = [
        [int(r.memory_usage(k, samples=0) or 0) for k in (keys.task(i), keys.events(i))]
        for i in sample
    ]
    shared_keys = [
        keys.tenant_tasks("bench"),
        *(keys.queued(s) for s in keys.shard_ids),
        *(keys.batch_counts(batch_id, s) for s in keys.shard_ids),
        keys.batch_tasks(batch_id),
    ]
    shared = [int(r.memory_usage(k, samples=0) or 0) for k in shared_keys]
    shared.append(int(rs.broker.memory_usage(TASK_QUEUE, samples=0) or 0))
    return {
        "tasks": n,
        "body_bytes": len(body),
        "intake_s": round(intake_s, 3),
        "intake_tasks_per_s": rate(n, intake_s),
        "intake_redis_cpu": redis_cpu(cpu_before, cpu_after, n),
        "status_poll_ms": p50_p95_ms(poll_s),
        "bytes_per_task": bytes_per_task(own, shared, n),
        "used_memory_per_task": round((after - before) / n, 1),
    }
