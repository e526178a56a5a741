"""docker-compose.yml brought up for real, offline, as a user would run it.

The images come from ``deploy/build-offline-images.sh`` (no registry: Redis and Prometheus
are built from Debian's packages) and compose runs with ``docker-compose.offline.yml``. The
stack gets a project name and host ports of its own (published on 127.0.0.1 only), so it
runs beside any other stack on the machine; every request goes to those loopback ports or
through ``docker exec``.

Needs a Docker engine, debootstrap and a compose implementation (``.ci/docker.sh`` installs
them). Fails, rather than skips, when one is missing; ACTFLEET_SKIP_DOCKER=1 skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from actfleet.client import Client
from tests.conftest import free_port

pytestmark = [
    pytest.mark.docker,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("ACTFLEET_SKIP_DOCKER") == "1", reason="ACTFLEET_SKIP_DOCKER=1"
    ),
]

REPO = Path(__file__).resolve().parents[2]
SANDBOX_LABEL = "actfleet.worker"
TURN_LATENCY_S = 1.5  # the fake model's reply time: a task lasts about two of them
CONCURRENCY = 4  # agent loops per worker: a batch cannot all land on one worker
SECOND_BATCH = 48  # four waves over three workers: the queue is not empty at the kill
# The worker's own lease and sweeper timings (store.keys): a dead worker's task is taken
# over about 45 s after its last heartbeat; give it room on a loaded machine.
TAKEOVER_TIMEOUT_S = 240.0


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no compose implementation: run .ci/docker.sh (it installs docker-compose)")


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 1.0) -> Any:
    """``check()``'s first truthy value within ``timeout_s``; fails the test with ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll_s)
    pytest.fail(f"{what} (within {timeout_s:g} s; last seen: {last!r})")


class ComposeStack:
    """One compose project of the repository's compose files, with its own ports."""

    def __init__(self, log_dir: Path) -> None:
        self.project = f"aft{uuid.uuid4().hex[:10]}"
        self.api_port = free_port()
        self.prometheus_port = free_port()
        self.log_dir = log_dir
        self.base = [
            *compose_command(),
            "-p",
            self.project,
            "-f",
            str(REPO / "docker-compose.yml"),
            "-f",
            str(REPO / "docker-compose.offline.yml"),
            "--profile",
            "demo",
        ]
        self.env = dict(
            os.environ,
            ACTFLEET_PUBLISH_ADDR="127.0.0.1",
            ACTFLEET_API_PORT=str(self.api_port),
            ACTFLEET_PROMETHEUS_PORT=str(self.prometheus_port),
            ACTFLEET_FAKE_LLM_PORT=str(free_port()),
            ACTFLEET_GRAFANA_PORT=str(free_port()),
            ACTFLEET_FAKE_LLM_LATENCY_S=str(TURN_LATENCY_S),
            ACTFLEET_WORKER_CONCURRENCY=str(CONCURRENCY),
            DOCKER_GID=str(os.stat("/var/run/docker.sock").st_gid),
        )
        self.worker_hosts: set[str] = set()  # every worker container's hostname seen
        self.prometheus = httpx.Client(
            base_url=f"http://127.0.0.1:{self.prometheus_port}", timeout=10
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def compose(self, *args: str, timeout_s: float = 300) -> str:
        proc = subprocess.run(
            [*self.base, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )
        with (self.log_dir / "compose.log").open("a") as log:
            log.write(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
        assert proc.returncode == 0, f"compose {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
        return proc.stdout

    def containers(self, service: str | None = None, all_: bool = False) -> list[str]:
        """Ids of this project's containers (of one service), running ones unless all_."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = docker("ps", "-q", "--no-trunc", *(["-a"] if all_ else []), *filters)
        return out.split()

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(docker("inspect", container))[0]

    def healthy(self, service: str, n: int) -> bool:
        ids = self.containers(service)
        states = [self.inspect(c)["State"] for c in ids]
        return len(ids) == n and all(s.get("Health", {}).get("Status") == "healthy" for s in states)

    def workers(self) -> dict[str, str]:
        """Running worker containers: hostname -> IP address on the compose network."""
        out = {}
        for c in self.containers("worker"):
            info = self.inspect(c)
            nets = info["NetworkSettings"]["Networks"].values()
            out[info["Config"]["Hostname"]] = next(iter(nets))["IPAddress"]
        self.worker_hosts.update(out)
        return out

    def leases(self) -> list[tuple[str, str, int]]:
        """(task id, owning worker id, events appended so far) of every live lease."""
        script = (
            "local out = {} "
            "for _, k in ipairs(redis.call('KEYS', 'af:{*}:lease:*')) do "
            "  local id = string.match(k, ':lease:(.*)$') "
            "  local seq = redis.call('HGET', (string.gsub(k, ':lease:', ':task:')), 'seq') or '0' "
            "  table.insert(out, id .. ' ' .. (redis.call('GET', k) or '') .. ' ' .. seq) "
            "end return out"
        )
        out = []
        for line in docker(
            "exec", self.containers("redis")[0], "redis-cli", "EVAL", script, "0"
        ).split("\n"):
            parts = line.split()
            if len(parts) == 3 and "/" in parts[1]:
                out.append((parts[0], parts[1].rsplit("/", 1)[0], int(parts[2])))
        return out

    def api_key(self) -> str:
        (api_id,) = self.containers("api")
        out = docker("exec", api_id, "actfleet", "keys", "create", "--tenant", "compose", "--json")
        return str(json.loads(out)["key"])

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = self.prometheus.get("/api/v1/query", params={"query": promql})
        resp.raise_for_status()
        return list(resp.json()["data"]["result"])

    def targets_up(self) -> dict[str, set[str]]:
        """job -> hosts of the scrape targets that are up."""
        resp = self.prometheus.get("/api/v1/targets", params={"state": "active"})
        resp.raise_for_status()
        out: dict[str, set[str]] = {}
        for t in resp.json()["data"]["activeTargets"]:
            if t["health"] == "up":
                out.setdefault(t["labels"]["job"], set()).add(
                    t["labels"]["instance"].rsplit(":", 1)[0]
                )
        return out

    def sandboxes(self, owner: Callable[[str], bool]) -> list[str]:
        """Sandbox containers (any state) whose worker label satisfies ``owner``."""
        out = docker(
            "ps",
            "-a",
            "--filter",
            f"label={SANDBOX_LABEL}",
            "--format",
            '{{.ID}} {{.Label "' + SANDBOX_LABEL + '"}}',
        )
        return [
            line.split()[0]
            for line in out.splitlines()
            if line.split()[1:] and owner(line.split()[1])
        ]

    def our_sandbox(self, worker_label: str) -> bool:
        return any(worker_label.startswith(f"{h}-") for h in self.worker_hosts)

    def dump_logs(self) -> None:
        proc = subprocess.run(
            [*self.base, "logs", "--no-color", "--tail", "300"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        (self.log_dir / "services.log").write_text(proc.stdout + proc.stderr)

    def close(self) -> None:
        """Take everything down even after a failure, including sandboxes left behind."""
        self.prometheus.close()
        subprocess.run(
            [*self.base, "down", "-v", "--remove-orphans", "--timeout", "20"],
            env=self.env,
            capture_output=True,
            timeout=300,
            cwd=REPO,
        )
        leftovers = self.containers(all_=True) + self.sandboxes(self.our_sandbox)
        if leftovers:
            subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True, timeout=120)


def docker(*args: str) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"docker {' '.join(args[:3])} failed: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def offline_images(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every image the stack needs, built from local parts. Set-up (``.ci/docker.sh``)
    builds them before the tests; here the build only confirms they are up to date, since a
    test may not reach a package registry (the network guard refuses it)."""
    log = tmp_path_factory.mktemp("images") / "build.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [str(REPO / "deploy" / "build-offline-images.sh")],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    if proc.returncode != 0:
        pytest.fail(
            "deploy/build-offline-images.sh failed (run it, or .ci/docker.sh, before the "
            f"tests):\n{log.read_text()[-4000:]}"
        )


@pytest.fixture
def stack(offline_images: None, tmp_path: Path) -> Iterator[ComposeStack]:
    s = ComposeStack(tmp_path)
    try:
        yield s
    finally:
        s.dump_logs()  # into the test's tmp dir, for a failure's post-mortem
        s.close()


def batch_of(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{tag}-{i}",
            "prompt": f"Compute: {i + 2}*{i + 3}",
            "expected": {"answer": (i + 2) * (i + 3), "grader": "numeric"},
            "limits": {"max_turns": 4, "exec_timeout_s": 10},
        }
        for i in range(n)
    ]


def assert_all_correct(client: Client, batch_id: str, specs: list[dict[str, Any]]) -> list[str]:
    results = list(client.batch_results(batch_id))
    assert [r["custom_id"] for r in results] == [s["custom_id"] for s in specs]
    for r, s in zip(results, specs, strict=True):
        assert (r["status"], r["answer"], r["correct"]) == (
            "completed",
            str(s["expected"]["answer"]),
            True,
        ), r
    return [r["task_id"] for r in results]


def starts_and_steps(
    client: Client, task_id: str
) -> tuple[list[str], Counter[tuple[int, str]], int]:
    """The workers that started the task (in order), its step events per (turn, type), and
    how many ``task.finished`` events its stream holds."""
    starters: list[str] = []
    steps: Counter[tuple[int, str]] = Counter()
    finished = 0
    for ev in client.events(task_id):
        if ev.type == "task.started":
            starters.append(ev.event["data"]["worker"])
        elif ev.type in ("llm.reply", "exec.result"):
            steps[(ev.event["turn"], ev.type)] += 1
        elif ev.type == "task.finished":
            finished += 1
    return starters, steps, finished


@pytest.mark.timeout(1500)
def test_compose_stack_runs_scales_survives_a_killed_worker_and_leaves_nothing(
    stack: ComposeStack,
) -> None:
    # -- up: one worker; the stack reaches healthy ---------------------------------------
    stack.compose("up", "-d", "--scale", "worker=1")
    wait_for(
        lambda: stack.healthy("redis", 1) and stack.healthy("api", 1), 180, "redis and api healthy"
    )
    wait_for(lambda: stack.healthy("worker", 1), 180, "the worker healthy")
    wait_for(lambda: stack.healthy("prometheus", 1), 180, "prometheus healthy")
    client = Client(stack.api_url, stack.api_key())

    # -- a batch through the published API port completes with correct answers -----------
    first = batch_of(6, "one")
    batch = client.submit_batch(first)
    status = client.wait_batch(batch["id"], poll_s=0.5, timeout_s=180)
    assert status["counts"]["completed"] == 6
    assert_all_correct(client, batch["id"], first)

    # -- Prometheus scrapes the API and the worker, and counted the batch -----------------
    workers = stack.workers()
    wait_for(
        lambda: (
            (up := stack.targets_up()).get("actfleet-api")
            and up.get("actfleet-worker") == set(workers.values())
        ),
        90,
        "prometheus shows the api and the worker up",
    )

    def finished_total() -> float | None:
        rows = stack.query('sum(actfleet_tasks_finished_total{job="actfleet-worker"})')
        return float(rows[0]["value"][1]) if rows else None

    wait_for(lambda: finished_total() == 6, 90, "actfleet_tasks_finished_total == 6")
    completed = stack.query('sum(actfleet_tasks_finished_total{status="completed"})')
    assert float(completed[0]["value"][1]) == 6

    # -- scale to three workers: Prometheus finds every one ------------------------------
    stack.compose("up", "-d", "--no-recreate", "--scale", "worker=3")
    wait_for(lambda: stack.healthy("worker", 3), 180, "three healthy workers")
    workers = stack.workers()
    assert len(workers) == 3
    wait_for(
        lambda: stack.targets_up().get("actfleet-worker") == set(workers.values()),
        120,
        "prometheus shows all three workers up",
    )

    # -- a batch spreads over the three; one is killed mid-batch -------------------------
    second = batch_of(SECOND_BATCH, "three")
    containers = {stack.inspect(c)["Config"]["Hostname"]: c for c in stack.containers("worker")}
    batch = client.submit_batch(second)

    def victim_mid_task() -> tuple[str, set[str]] | None:
        held: dict[str, set[str]] = {}
        for task_id, worker_id, seq in stack.leases():
            if seq >= 1:  # claimed and started: its model call is under way
                held.setdefault(worker_id, set()).add(task_id)
        busiest = max(held.items(), key=lambda kv: len(kv[1]), default=None)
        return busiest if busiest and len(busiest[1]) >= 2 else None

    victim_id, _ = wait_for(victim_mid_task, 120, "a worker in the middle of two tasks", poll_s=0.2)
    victim_host = victim_id.split("-", 1)[0]
    docker("kill", containers[victim_host])
    # what it held when it died (a task it finished just before is not among them)
    victim_tasks = {t for t, w, _ in stack.leases() if w == victim_id}
    assert victim_tasks, "the killed worker held no task"

    status = client.wait_batch(batch["id"], poll_s=1, timeout_s=TAKEOVER_TIMEOUT_S)
    assert status["counts"]["completed"] == SECOND_BATCH, status
    ids = assert_all_correct(client, batch["id"], second)

    # nothing lost, nothing twice: each task finished once, each step appears once
    started_on: Counter[str] = Counter()
    for task_id in ids:
        starters, steps, finished = starts_and_steps(client, task_id)
        assert finished == 1, task_id
        assert set(steps.values()) == {1}, (task_id, steps)
        assert set(steps) == {(1, "llm.reply"), (1, "exec.result"), (2, "llm.reply")}, steps
        started_on.update({w.split("-", 1)[0] for w in starters})
        if task_id in victim_tasks:
            # taken over: a later attempt on another worker finished it
            assert starters[0] == victim_id and starters[-1].split("-", 1)[0] != victim_host, (
                task_id,
                starters,
            )
    assert set(started_on) >= set(workers), f"each worker ran some tasks: {started_on}"

    # the killed worker's sandboxes are reaped by the others (by label, not by its own hand)
    wait_for(
        lambda: not stack.sandboxes(lambda w: w == victim_id),
        180,
        "the killed worker's sandbox containers removed",
    )

    # -- down -v: no container, network, volume or sandbox left --------------------------
    stack.compose("down", "-v", "--remove-orphans", "--timeout", "30")
    project = f"label=com.docker.compose.project={stack.project}"
    assert stack.containers(all_=True) == []
    assert docker("network", "ls", "-q", "--filter", project).split() == []
    assert docker("network", "ls", "-q", "--filter", f"name={stack.project}_").split() == []
    assert docker("volume", "ls", "-q", "--filter", project).split() == []
    assert stack.sandboxes(stack.our_sandbox) == []
