"""The fleet across several hosts, and a worker host cut off mid-batch.

The test makes its own hosts: a network namespace each for Redis, the API (with the fake
model server) and two workers, wired by veth pairs to a bridge that lives in a namespace of
its own (so the host's firewall, which Docker sets to drop bridged traffic, never sees it),
on a /24 of 10.231.0.0/16 that no interface of this machine uses. The test process reaches
the hosts through one more veth; nothing leaves the machine. Every process is real:
redis-server with AOF, ``actfleet api``, ``actfleet fake-llm``, ``actfleet worker`` with
bwrap sandboxes.

Each task takes four turns (three cells that build up ``acc``, then the answer), so a task
taken over by the other host answers ``3`` only if its sandbox state was rebuilt there.

Needs root, iproute2 and bubblewrap (``scripts/setup.sh`` installs them).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from actfleet.client import Client
from agent.events import EventType
from agent.models import Status
from store.apikeys import create_key
from store.keys import Keys
from store.worker_store import WorkerStore
from tests.netguard import guard

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
    pytest.mark.skipif(os.geteuid() != 0, reason="makes network namespaces: needs root"),
]

TURN_LATENCY_S = 1.0
CONCURRENCY = 6  # per worker: a batch of BATCH tasks cannot all land on one host
BATCH = 10
SCRIPT = [
    {"when": {"turn": 1}, "reply": "<execute>\nacc = 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 2}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 3}, "reply": "<execute>\nacc += 1\nprint('acc', acc)\n</execute>"},
    {"when": {"turn": 4, "last_regex": "acc (?P<out>\\d+)"}, "reply": "<solution>{out}</solution>"},
]
STEP_TYPES = (EventType.LLM_REPLY, EventType.EXEC_RESULT)
# A cut-off worker's lease lapses 30 s after its last renewal and a live worker's sweeper
# re-queues the task within about 15 s more (store.keys); room for a loaded machine.
TAKEOVER_TIMEOUT_S = 240.0
REJOIN_TIMEOUT_S = 240.0


def ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (redis.RedisError, httpx.HTTPError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(poll_s)
    pytest.fail(f"{what} (within {timeout_s:g} s; last seen: {last!r})")


def unused_subnet() -> str:
    """A 10.231.X prefix that no address or route of this machine mentions."""
    seen = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    ).stdout
    seen += subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    free = [x for x in range(256) if f"10.231.{x}." not in seen]
    assert free, "every 10.231.X.0/24 is in use on this machine"
    return f"10.231.{random.choice(free)}"


@dataclass
class Host:
    name: str  # role: redis, api, worker-a, worker-b
    netns: str
    addr: str
    port: str  # its veth's end on the bridge, in the switch namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


class Lab:
    """Hosts in network namespaces on one bridge; a veth from the test's namespace."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:6]
        self.net = unused_subnet()
        guard.allow(f"{self.net}.0/24")  # the hosts this test makes are the network rule's too
        self.switch = f"af{self.tag}-sw"
        self.client_if = f"af{self.tag}c"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []

    def build(self, roles: list[str]) -> None:
        ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        # the test's own leg: 10.231.X.1 in this (the root) namespace
        ip(
            "link",
            "add",
            self.client_if,
            "type",
            "veth",
            "peer",
            "name",
            "client",
            "netns",
            self.switch,
        )
        ip("-n", self.switch, "link", "set", "client", "master", "br0", "up")
        ip("addr", "add", f"{self.net}.1/24", "dev", self.client_if)
        ip("link", "set", self.client_if, "up")
        for i, role in enumerate(roles, start=2):
            ns = f"af{self.tag}-{role}"
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            port = f"p-{role}"
            ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                self.switch,
            )
            ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.net}.{i}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self.hosts[role] = Host(role, ns, f"{self.net}.{i}", port)

    def run(
        self, role: str, args: list[str], env: dict[str, str], log: str
    ) -> subprocess.Popen[bytes]:
        host = self.hosts[role]
        out = (self.tmp / log).open("ab")
        # `ip netns exec` execs the command: the Popen's pid is the process itself.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *args], env=env, stdout=out, stderr=out
        )
        host.procs.append(proc)
        return proc

    def cut(self, role: str) -> None:
        """Unplug the host's cable at the switch: its packets go nowhere, nothing resets."""
        ip("-n", self.switch, "link", "set", self.hosts[role].port, "down")

    def plug(self, role: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[role].port, "master", "br0", "up")

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=15)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.client_if], capture_output=True, timeout=30)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if shutil.which("ip") is None:
        pytest.fail("iproute2 is missing (scripts/setup.sh installs it)")
    lab = Lab(tmp_path)
    try:
        lab.build(["redis", "api", "worker-a", "worker-b"])
        yield lab
    finally:
        lab.close()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"af{lab.tag}-" not in left, "a namespace of the test outlived it"


@dataclass
class Fleet:
    lab: Lab
    store: WorkerStore
    client: Client
    workers: dict[str, subprocess.Popen[bytes]]

    def worker_id_of(self, role: str, ids: list[str]) -> set[str]:
        pid = self.workers[role].pid
        return {w for w in ids if f"-{pid}-" in w}

    def leases(self) -> dict[str, str]:
        """task id -> the worker id holding its lease."""
        r = self.store.r
        out = {}
        for key in r.scan_iter("af:{*}:lease:*"):
            owner: bytes | None = r.get(key)  # type: ignore[assignment]
            if owner is not None:
                out[key.decode().rsplit(":", 1)[1]] = owner.decode().rsplit("/", 1)[0]
        return out

    def seq(self, task_id: str) -> int:
        return int(self.store.r.hget(self.store.keys.task(task_id), "seq") or 0)

    def log_of(self, role: str) -> list[dict[str, Any]]:
        out = []
        for line in (self.lab.tmp / f"{role}.log").read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def log_tail(self, role: str, n: int = 40) -> str:
        return "\n".join(
            (self.lab.tmp / f"{role}.log").read_text(errors="replace").splitlines()[-n:]
        )


def start_fleet(lab: Lab) -> Iterator[Fleet]:
    hosts = lab.hosts
    redis_url = f"redis://{hosts['redis'].addr}:6379/0"
    data = lab.tmp / "redis-data"
    data.mkdir()
    lab.run(
        "redis",
        [
            shutil.which("redis-server") or "redis-server",
            "--bind",
            hosts["redis"].addr,
            "--port",
            "6379",
            "--protected-mode",
            "no",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
        dict(os.environ),
        "redis.log",
    )
    r = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
    wait_for(r.ping, 20, "redis answers on its host")

    script = lab.tmp / "script.json"
    script.write_text(json.dumps(SCRIPT))
    api_host = hosts["api"].addr
    env = dict(
        os.environ,
        ACTFLEET_REDIS_URL=redis_url,
        OPENAI_BASE_URL=f"http://{api_host}:8900/v1",
        OPENAI_API_KEY="not-needed",
        ACTFLEET_SANDBOX="bwrap",
        ACTFLEET_LOG_FORMAT="json",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    actfleet = [sys.executable, "-m", "actfleet"]
    lab.run(
        "api",
        [
            *actfleet,
            "fake-llm",
            "--host",
            api_host,
            "--port",
            "8900",
            "--script",
            str(script),
            "--latency",
            str(TURN_LATENCY_S),
        ],
        env,
        "fake-llm.log",
    )
    lab.run("api", [*actfleet, "api", "--host", api_host, "--port", "8000"], env, "api.log")
    workers = {
        role: lab.run(
            role, [*actfleet, "worker", "--concurrency", str(CONCURRENCY)], env, f"{role}.log"
        )
        for role in ("worker-a", "worker-b")
    }
    wait_for(
        lambda: httpx.get(f"http://{api_host}:8000/healthz", timeout=2).is_success,
        60,
        "the API answers",
    )
    wait_for(lambda: len(list(r.scan_iter("af:worker:*"))) == 2, 90, "both workers heartbeat")
    key, _ = create_key(r, Keys("af"), "lab")
    client = Client(f"http://{api_host}:8000", key)
    try:
        yield Fleet(lab, WorkerStore(r, Keys("af")), client, workers)
    finally:
        client.close()
        r.close()


@pytest.fixture
def fleet(lab: Lab) -> Iterator[Fleet]:
    yield from start_fleet(lab)


def batch(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{tag}-{i}",
            "prompt": f"count #{i}",
            "expected": {"answer": "3"},
            "limits": {"max_turns": 6},
        }
        for i in range(n)
    ]


def wait_batch(fleet: Fleet, batch_id: str, timeout_s: float) -> list[str]:
    status = fleet.client.wait_batch(batch_id, poll_s=1, timeout_s=timeout_s)
    assert status["finished"] == status["total"], status
    return [r["task_id"] for r in fleet.client.batch_results(batch_id)]


def assert_exactly_once_correct(fleet: Fleet, task_id: str) -> list[str]:
    """The task ended once, correct, every step once; returns who started it, in order."""
    rec = fleet.store.get(task_id)
    assert rec is not None and rec.result is not None, task_id
    assert (rec.status, rec.result.answer, rec.result.correct) == (Status.COMPLETED, "3", True), (
        task_id,
        rec.result,
    )
    events = fleet.store.events(task_id)
    steps = Counter((e.turn, e.type) for e in events if e.type in STEP_TYPES)
    assert len(steps) == 7 and set(steps.values()) == {1}, (task_id, steps)
    assert [e.type for e in events].count(EventType.FINISHED) == 1, task_id
    assert events[-1].type is EventType.FINISHED
    return [str(e.data["worker"]) for e in events if e.type is EventType.STARTED]


@pytest.mark.timeout(900)
def test_a_cut_off_worker_host_is_taken_over_fenced_and_rejoins(fleet: Fleet) -> None:
    # given a batch running on both worker hosts
    first = fleet.client.submit_batch(batch(BATCH, "one"))

    def both_mid_task() -> dict[str, str] | None:
        leases = fleet.leases()
        mid = {t: w for t, w in leases.items() if fleet.seq(t) >= 3}
        on_b = fleet.worker_id_of("worker-b", list(mid.values()))
        on_a = fleet.worker_id_of("worker-a", list(mid.values()))
        return leases if on_a and on_b else None

    wait_for(both_mid_task, 120, "both worker hosts in the middle of tasks", poll_s=0.2)

    # when worker B's host loses its link mid-batch
    fleet.lab.cut("worker-b")
    time.sleep(1.0)  # writes already on the wire land (or not) before the snapshot
    leases = fleet.leases()
    b_ids = fleet.worker_id_of("worker-b", list(leases.values()))
    assert len(b_ids) == 1, f"worker B held no task when its link went down: {leases}"
    (b_id,) = b_ids
    b_tasks = {t for t, w in leases.items() if w == b_id}
    b_attempt = {t: fleet.store.get(t).attempt for t in b_tasks}  # type: ignore[union-attr]
    b_events = {
        t: sum(1 for e in fleet.store.events(t) if e.attempt == b_attempt[t]) for t in b_tasks
    }

    # then worker A takes B's tasks over once their leases lapse, and every task ends once
    ids = wait_batch(fleet, first["id"], TAKEOVER_TIMEOUT_S)
    assert len(ids) == BATCH
    started_on: set[str] = set()
    for task_id in ids:
        starters = assert_exactly_once_correct(fleet, task_id)
        started_on.update(starters)
        if task_id in b_tasks:
            assert starters[-1] != b_id and fleet.worker_id_of("worker-a", starters[-1:]), starters
    assert fleet.worker_id_of("worker-a", list(started_on)) and b_id in started_on

    # when B's link comes back
    fleet.lab.plug("worker-b")

    # then B finds out it lost those leases, and nothing it writes for them lands
    def b_fenced() -> bool:
        seen = {
            str(line.get("task_id"))
            for line in fleet.log_of("worker-b")
            if line.get("event") in ("lease.lost", "task.fenced_out")
        }
        return b_tasks <= seen

    wait_for(
        b_fenced,
        180,
        f"worker B noticing it lost {sorted(b_tasks)}; its log:\n{fleet.log_tail('worker-b')}",
    )

    # and it rejoins by itself: it takes new tasks again. Its consumer learns that its
    # connection outlived the cut only when Redis's retransmitted reply gets through (TCP
    # backs off up to 2 min), so new tasks keep coming until B takes one or time is up.
    plugged = time.monotonic()
    rejoined_after_s: float | None = None
    round_ = 0
    while rejoined_after_s is None and time.monotonic() - plugged < REJOIN_TIMEOUT_S:
        round_ += 1
        more = fleet.client.submit_batch(batch(CONCURRENCY, f"again{round_}"))
        for task_id in wait_batch(fleet, more["id"], 180):
            if b_id in assert_exactly_once_correct(fleet, task_id):
                rejoined_after_s = time.monotonic() - plugged
    assert rejoined_after_s is not None, (
        f"worker B ({b_id}) took no new task in {REJOIN_TIMEOUT_S:g} s after its link came "
        f"back; its log:\n{fleet.log_tail('worker-b')}"
    )
    print(f"worker B took a new task {rejoined_after_s:.0f} s after its link came back")

    # B's late writes were fenced out: its attempt's events are as they were when it was cut
    for task_id in b_tasks:
        events = fleet.store.events(task_id)
        mine = [i for i, e in enumerate(events) if e.attempt == b_attempt[task_id]]
        later = [i for i, e in enumerate(events) if e.attempt > b_attempt[task_id]]
        assert len(mine) == b_events[task_id], (task_id, [e.to_dict() for e in events])
        assert later and max(mine) < min(later), task_id
        rec = fleet.store.get(task_id)
        assert (
            rec is not None and rec.result is not None and rec.result.attempt > b_attempt[task_id]
        )
