"""The Docker backend against hostile code: a real engine, the real image, no mocks.

Needs a running Docker engine and the sandbox image (``.ci/docker.sh`` provides both). These
tests fail, rather than skip, when either is missing; set ACTFLEET_SKIP_DOCKER=1 to skip them.
Every test runs under its own worker id and checks that no container with it is left.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from agent.models import TaskSpec
from workers.sandbox.docker import (
    DEFAULT_IMAGE,
    LABEL_EXPIRES,
    LABEL_FLEET,
    LABEL_SANDBOX,
    LABEL_TASK,
    LABEL_WORKER,
    DockerProvider,
    DockerSandbox,
    Hardening,
    SandboxRefused,
)
from workers.sandbox.reaper import Reaper

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("ACTFLEET_SKIP_DOCKER") == "1", reason="ACTFLEET_SKIP_DOCKER=1"
    ),
]

IMAGE = os.environ.get("ACTFLEET_SANDBOX_IMAGE", DEFAULT_IMAGE)
REPO = Path(__file__).resolve().parents[2]


def make_spec(**overrides: object) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "test", **overrides})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def api() -> docker.APIClient:
    try:
        client = docker.APIClient(**docker.utils.kwargs_from_env())
        client.ping()
    except Exception as e:
        pytest.fail(f"no Docker engine ({e}): run .ci/docker.sh, or set ACTFLEET_SKIP_DOCKER=1")
    try:
        client.inspect_image(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: run sandbox_images/build.sh")
    return client


def containers_of(api: docker.APIClient, worker_id: str) -> list[dict]:
    return api.containers(all=True, filters={"label": f"{LABEL_WORKER}={worker_id}"})


@pytest.fixture
def fleet() -> str:
    """This test's own fleet: its reapers cannot touch other sessions' containers."""
    return f"testfleet-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def worker_id(api: docker.APIClient) -> Iterator[str]:
    """A fresh worker id; after the test, no container of it may be left."""
    wid = f"test-{uuid.uuid4().hex[:10]}"
    yield wid
    leftovers = containers_of(api, wid)
    for c in leftovers:
        with contextlib.suppress(docker.errors.APIError):
            api.remove_container(c["Id"], force=True)
    assert not leftovers, f"containers left behind: {[c['Names'] for c in leftovers]}"


@pytest.fixture
def provider(api: docker.APIClient, worker_id: str, fleet: str) -> Iterator[DockerProvider]:
    p = DockerProvider(worker_id=worker_id, fleet=fleet, client=api, image=IMAGE)
    yield p
    p.close()


@pytest.fixture
def sandbox(provider: DockerProvider) -> Iterator[DockerSandbox]:
    sb = provider.start(make_spec(), "task-hostile")
    yield sb
    sb.close()


# -- configuration ------------------------------------------------------------------------


def test_inspect_shows_every_hardening_setting(
    api: docker.APIClient, provider: DockerProvider, sandbox: DockerSandbox
) -> None:
    info = api.inspect_container(sandbox.container_id)
    host, config = info["HostConfig"], info["Config"]
    hardening = Hardening()

    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert f"size={hardening.workdir_mb}m" in host["Tmpfs"]["/work"]
    assert f"size={hardening.tmp_mb}m" in host["Tmpfs"]["/tmp"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["Privileged"] is False
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any("seccomp=unconfined" in o for o in host["SecurityOpt"])
    assert host["PidsLimit"] == hardening.pids_limit
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 1_000_000_000
    ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert ulimits["nofile"] == (hardening.nofile, hardening.nofile)
    assert ulimits["fsize"] == (hardening.fsize_mb * 2**20,) * 2
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-file": "1", "max-size": hardening.log_max_size},
    }
    assert host["Init"] is True
    assert not host["Binds"] and not host.get("Mounts") and not info["Mounts"]
    assert host["IpcMode"] == "private"
    assert config["User"] == "10001:10001"
    env_keys = {e.split("=", 1)[0] for e in config["Env"]}
    assert env_keys <= {
        "PATH",
        "LANG",
        "HOME",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "MPLCONFIGDIR",
    }
    labels = config["Labels"]
    assert labels[LABEL_SANDBOX] == "1"
    assert labels[LABEL_TASK] == "task-hostile"
    assert labels[LABEL_WORKER] == provider.worker_id
    assert time.time() < int(labels[LABEL_EXPIRES]) <= time.time() + 900 + 300 + 5

    # ... and from inside: seccomp filter on, no privileges, non-root, no docker socket
    r = sandbox.execute(
        textwrap.dedent(
            """
            import os
            status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines())
            (status['Seccomp'].strip(), status['NoNewPrivs'].strip(), status['CapEff'].strip(),
             os.getuid(), os.path.exists('/var/run/docker.sock'), os.getcwd(),
             sorted(os.listdir('/sys/class/net')))
            """
        ),
        10,
        2000,
    )
    assert r.error is None, r.error
    assert r.value == "('2', '1', '0000000000000000', 10001, False, '/work', ['lo'])"


def test_network_request_refused_unless_the_server_allows_it(provider: DockerProvider) -> None:
    with pytest.raises(SandboxRefused):
        provider.start(make_spec(sandbox={"network": True}), "task-net")
    with pytest.raises(SandboxRefused):
        provider.start(make_spec(sandbox={"image": "debian:bookworm"}), "task-image")


def test_network_when_allowed_is_a_bridge_without_inter_container_traffic(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    provider = DockerProvider(
        worker_id=worker_id, fleet=fleet, client=api, image=IMAGE, allow_network=True
    )
    sb = provider.start(make_spec(sandbox={"network": True}), "task-net")
    try:
        info = api.inspect_container(sb.container_id)
        network = Hardening().network_name
        assert info["HostConfig"]["NetworkMode"] == network
        options = api.inspect_network(network)["Options"]
        assert options["com.docker.network.bridge.enable_icc"] == "false"
        r = sb.execute("import os; sorted(os.listdir('/sys/class/net'))", 10, 2000)
        assert r.value == "['eth0', 'lo']"
    finally:
        sb.close()
        provider.close()


def test_files_and_setup_code_are_applied(provider: DockerProvider) -> None:
    spec = make_spec(
        setup_code="import numpy as np\nBASE = 40",
        files=[{"path": "data/in.txt", "content_b64": b64(b"2")}],
    )
    sb = provider.start(spec, "task-files")
    try:
        r = sb.execute("BASE + int(open('data/in.txt').read()) + int(np.int64(0))", 10, 2000)
        assert (r.error, r.value) == (None, "42")
    finally:
        sb.close()


# -- hostile code -------------------------------------------------------------------------


def test_fork_bomb_stays_under_the_pids_limit(sandbox: DockerSandbox) -> None:
    flood = textwrap.dedent(
        """
        import os, time
        pids, err = [], None
        try:
            for _ in range(2000):
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                pids.append(pid)
        except OSError as e:
            err = type(e).__name__
        for p in pids:
            os.kill(p, 9)
            os.waitpid(p, 0)
        (len(pids), err)
        """
    )
    r = sandbox.execute(flood, 20, 2000)
    assert r.error is None, r.error
    count, err = eval(r.value or "")
    assert count < Hardening().pids_limit and err == "BlockingIOError"

    started = time.monotonic()
    r = sandbox.execute("import os\nwhile True:\n    os.fork()", 2, 2000)
    # a liveness bound, not a speed target: killing ~256 spinning processes takes a moment
    assert time.monotonic() - started < 2 + 10
    assert r.timed_out or r.error or r.state_lost
    r = sandbox.execute("6 * 7", 10, 2000)  # the worker and the session go on
    assert r.value == "42"


def test_memory_hog_is_oom_killed_and_the_model_is_told(provider: DockerProvider) -> None:
    spec = make_spec(
        sandbox={"memory_mb": 128},
        setup_code="GREETING = 'hi'",
        files=[{"path": "f.txt", "content_b64": b64(b"kept")}],
    )
    sb = provider.start(spec, "task-oom")
    try:
        first = sb.container_id
        sb.execute("lost = 1", 10, 2000)
        r = sb.execute("x = b'a' * (1024 * 1024 * 1024)", 20, 2000)
        assert r.state_lost and not r.ok
        assert r.note is not None and "out of memory" in r.note and "128 MB" in r.note
        # the next execution runs in a fresh container, files and setup_code re-applied
        r = sb.execute("(GREETING, open('f.txt').read(), 'lost' in globals())", 10, 2000)
        assert r.value == "('hi', 'kept', False)"
        assert sb.container_id != first and sb.restarts == 1
    finally:
        sb.close()


def test_code_that_will_not_stop_gets_its_container_killed(
    api: docker.APIClient, sandbox: DockerSandbox
) -> None:
    first = sandbox.container_id
    code = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass"
    started = time.monotonic()
    r = sandbox.execute(code, 2, 2000)
    assert time.monotonic() - started < 2 + 5  # liveness: the host deadline is 2 s + grace
    assert r.timed_out and r.state_lost and "killed" in (r.note or "")
    with pytest.raises(docker.errors.NotFound):
        api.inspect_container(first)
    assert sandbox.execute("1 + 1", 5, 2000).value == "2"


def test_filling_the_disk_stops_at_the_cap(sandbox: DockerSandbox) -> None:
    code = textwrap.dedent(
        """
        written, err = 0, None
        try:
            with open('big.bin', 'wb') as f:
                while True:
                    f.write(b'\\0' * (1 << 20))
                    written += 1 << 20
        except OSError as e:
            err = type(e).__name__ + ': ' + str(e.strerror)
        (written, err)
        """
    )
    r = sandbox.execute(code, 60, 2000)
    assert r.error is None, r.error
    written, err = eval(r.value or "")
    assert written <= Hardening().workdir_mb * 2**20 and err is not None
    assert "No space left" in err or "too large" in err
    r = sandbox.execute("import os; os.remove('big.bin'); 'ok'", 10, 2000)
    assert r.value == "'ok'"


# -- lifecycle: reaper and pool ----------------------------------------------------------

HOLDER = """
import sys, time
from agent.models import TaskSpec
from workers.sandbox.docker import DockerProvider
provider = DockerProvider(worker_id=sys.argv[1], image=sys.argv[2], fleet=sys.argv[3])
sandbox = provider.start(TaskSpec(prompt="x"), "task-orphan")
print("CONTAINER", sandbox.container_id, flush=True)
sandbox.execute("while True: pass", 600, 100)
"""


def test_sigkilled_worker_leaves_a_container_the_reaper_removes(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, worker_id, IMAGE, fleet],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
    )
    try:
        assert proc.stdout is not None
        container_id = ""
        for line in proc.stdout:  # log lines may come first
            if line.startswith("CONTAINER "):
                container_id = line.split()[1]
                break
        assert container_id, "the holder process did not start a sandbox"
        time.sleep(0.5)  # let it enter the busy loop
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [c["Id"] for c in containers_of(api, worker_id)] == [container_id]

    live_worker_reaper = Reaper(api, is_worker_alive=lambda w: True, fleet=fleet, min_age_s=0)
    assert worker_id not in {r.worker for r in live_worker_reaper.reap_once()}
    assert containers_of(api, worker_id)

    reaper = Reaper(api, is_worker_alive=lambda w: w != worker_id, fleet=fleet, min_age_s=0)
    reaped = [r for r in reaper.reap_once() if r.worker == worker_id]
    assert [(r.container_id, r.reason, r.task) for r in reaped] == [
        (container_id, "worker_dead", "task-orphan")
    ]
    assert containers_of(api, worker_id) == []


def test_reaper_removes_expired_containers_of_live_workers(
    api: docker.APIClient, provider: DockerProvider, worker_id: str, fleet: str
) -> None:
    sb = provider.start(make_spec(), "task-expiring")
    try:
        young = Reaper(api, is_worker_alive=lambda w: w != worker_id, fleet=fleet, min_age_s=3600)
        assert worker_id not in {r.worker for r in young.reap_once()}  # too young to judge
        future = Reaper(
            api, is_worker_alive=lambda w: True, fleet=fleet, clock=lambda: time.time() + 10**6
        )
        reaped = [r for r in future.reap_once() if r.worker == worker_id]
        assert [r.reason for r in reaped] == ["expired"]
        r = sb.execute("1", 5, 2000)
        assert r.state_lost  # its container is gone; the sandbox says so and would restart
    finally:
        sb.close()


def test_periodic_reaper_runs_in_the_background(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    seen: list[str] = []

    def alive(w: str) -> bool:
        seen.append(w)
        return True

    reaper = Reaper(api, is_worker_alive=alive, fleet=fleet, min_age_s=0)
    holder = DockerProvider(worker_id=worker_id, fleet=fleet, client=api, image=IMAGE)
    sb = holder.start(make_spec(), "task-periodic")
    try:
        reaper.start(interval_s=0.2)
        deadline = time.monotonic() + 10
        while worker_id not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker_id in seen
    finally:
        reaper.stop()
        sb.close()


def test_warm_pool_hits_misses_and_expiry(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    provider = DockerProvider(
        worker_id=worker_id,
        fleet=fleet,
        client=api,
        image=IMAGE,
        pool_min_size=1,
        pool_max_size=2,
        pool_idle_ttl_s=1.5,
        pool_max_age_s=4.0,
    )
    try:
        provider.start_pool()
        assert provider.wait_pool_ready(timeout_s=30)
        pooled = containers_of(api, worker_id)
        assert len(pooled) == 1 and pooled[0]["Labels"]["actfleet.pool"] == "1"

        hit = provider.start(make_spec(), "task-warm-1")
        miss = provider.start(make_spec(), "task-warm-2")  # pool empty: made on the spot
        try:
            assert hit.pool_hit
            assert not miss.pool_hit
            assert hit.execute("1 + 1", 5, 100).value == "2"
            assert miss.execute("2 + 2", 5, 100).value == "4"
        finally:
            hit.close()
            miss.close()
        stats = provider.pool_stats()
        assert (stats.hits, stats.misses) == (1, 1)

        # the miss raised the target to max_size; after idle_ttl_s it falls back to min_size
        assert provider.wait_pool_ready(timeout_s=30)
        deadline = time.monotonic() + 30
        while provider.pool_stats().idle < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert provider.pool_stats().idle == 2
        deadline = time.monotonic() + 15
        while provider.pool_stats().idle > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = provider.pool_stats()
        assert (stats.idle, stats.target) == (1, 1)

        # a container older than max_age_s is replaced
        before = {c["Id"] for c in containers_of(api, worker_id)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = {c["Id"] for c in containers_of(api, worker_id) if c["State"] == "running"}
            if now and not now & before:
                break
            time.sleep(0.2)
        assert now and not now & before
        assert provider.pool_stats().destroyed >= 2
    finally:
        provider.close()
    assert containers_of(api, worker_id) == []


# -- fleets and the server's ceilings ------------------------------------------------------


def test_a_reaper_removes_only_its_own_fleets_containers(api: docker.APIClient) -> None:
    # Given two deployments on one engine, each with a container of a worker that its own
    # Redis does not know (to the other deployment, every worker of the first is unknown)
    fleets = {name: f"testfleet-{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b")}
    workers = {name: f"test-{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b")}
    providers = {
        name: DockerProvider(worker_id=workers[name], fleet=fleets[name], client=api, image=IMAGE)
        for name in fleets
    }
    sandboxes = {name: p.start(make_spec(), f"task-{name}") for name, p in providers.items()}
    try:
        labels = api.inspect_container(sandboxes["a"].container_id)["Config"]["Labels"]
        assert labels[LABEL_FLEET] == fleets["a"]
        # When fleet a's reaper runs, finding every worker dead
        reaper = Reaper(api, is_worker_alive=lambda w: False, fleet=fleets["a"], min_age_s=0)
        reaped = reaper.reap_once()
        # Then it removed fleet a's container and left fleet b's running
        assert [(r.worker, r.reason) for r in reaped] == [(workers["a"], "worker_dead")]
        assert containers_of(api, workers["a"]) == []
        [b] = containers_of(api, workers["b"])
        assert b["State"] == "running"
        assert sandboxes["b"].execute("1 + 1", 10, 100).value == "2"
        # and even with every container expired, fleet a's reaper touches nothing of b's
        future = Reaper(
            api,
            is_worker_alive=lambda w: True,
            fleet=fleets["a"],
            clock=lambda: time.time() + 10**7,
        )
        assert future.reap_once() == []
    finally:
        for name in fleets:
            sandboxes[name].close()
            providers[name].close()
    assert containers_of(api, workers["b"]) == []


def test_the_default_fleet_differs_between_deployments_and_agrees_within_one() -> None:
    from config.settings import Settings

    one = Settings(redis_url="redis://redis-a:6379/0")
    assert one.fleet == Settings(redis_url="redis://redis-a:6379/0").fleet
    assert one.fleet != Settings(redis_url="redis://redis-b:6379/0").fleet
    assert one.fleet != Settings(redis_url="redis://redis-a:6379/0", key_prefix="other").fleet
    assert Settings(fleet_id="prod-eu").fleet == "prod-eu"


def test_work_is_capped_in_size_and_files_and_memory_past_the_limit_is_killed(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    # Given a server whose containers get 16 MB and 200 files of /work
    provider = DockerProvider(
        worker_id=worker_id,
        fleet=fleet,
        client=api,
        image=IMAGE,
        hardening=Hardening(workdir_mb=16, workdir_files=200),
    )
    sb = provider.start(make_spec(sandbox={"memory_mb": 128}), "task-caps")
    try:
        # When the code fills /work, then makes empty files until it cannot
        code = textwrap.dedent(
            """
            import os
            written, err = 0, None
            try:
                with open('big.bin', 'wb') as f:
                    while True:
                        f.write(b'\\0' * (1 << 20))
                        f.flush()
                        written += 1 << 20
            except OSError as e:
                err = e.strerror
            os.remove('big.bin')
            made, err2 = 0, None
            try:
                while made < 100_000:
                    open(f'f{made}', 'w').close()
                    made += 1
            except OSError as e:
                err2 = e.strerror
            (written >> 20, err, made, err2)
            """
        )
        r = sb.execute(code, 60, 2000)
        assert r.error is None, r.error
        mb, err, made, err2 = eval(r.value or "")
        # Then both stop at the caps
        assert mb <= 16 and err == "No space left on device"
        assert made < 200 and err2 == "No space left on device"
        # And allocating past the 128 MB asked for kills the container, and the model is told
        r = sb.execute("b = bytearray(512 << 20)\nb[::4096] = b'x' * len(b[::4096])", 60, 2000)
        assert r.state_lost or (r.error is not None and "MemoryError" in r.error), r
    finally:
        sb.close()
        provider.close()


def test_a_task_asking_for_more_than_the_servers_caps_is_refused(
    api: docker.APIClient, worker_id: str, fleet: str
) -> None:
    provider = DockerProvider(
        worker_id=worker_id,
        fleet=fleet,
        client=api,
        image=IMAGE,
        hardening=Hardening(max_memory_mb=512, max_cpus=1.0),
    )
    with pytest.raises(SandboxRefused, match=r"memory_mb: 1024 is over this server's cap of 512"):
        provider.start(make_spec(sandbox={"memory_mb": 1024}), "task-big")
    with pytest.raises(SandboxRefused, match="ACTFLEET_SANDBOX_MAX_CPUS"):
        provider.start(make_spec(sandbox={"cpus": 2}), "task-cpus")
