"""The Docker sandbox backend: one disposable, hardened container per task.

Each sandbox is one container running the image's runner (``sandbox_images/python``) as its
entry point. The host talks to it over the container's attached stdin/stdout (one attach
socket for the container's life, no ``docker exec`` per step), with the shared
``SessionClient``. Every container is hardened the same way (``container_config``): no
network unless the task asks and the server allows it, a read-only root with size-capped
tmpfs at /work and /tmp, all capabilities dropped, no-new-privileges, Docker's default
seccomp profile, pids/memory(=memory+swap)/CPU limits, file-size and open-file ulimits, a
capped log, a non-root user, an init process, no mounts, an empty environment and labels
naming the fleet, the task, the worker and an expiry time. Nothing here is chosen by the model: the
task spec's ``sandbox`` section picks an allowed image and resources within server caps.

Lifecycle: ``DockerSandbox`` is a ``session.Session`` (shared with the bwrap backend, which
says every outcome); its boxes are containers. ``close`` removes the container on every
path; an execution that will not stop by ``timeout_s + grace`` gets its container killed
(``state_lost``), an out-of-memory kill is read from the container's state, and the next
``execute`` starts a fresh container with the task's files and ``setup_code`` re-applied.
Containers a worker failed to remove (it was SIGKILLed, say) are removed by
``reaper.Reaper``, by label (``DockerProvider.start_housekeeping``).

Errors::

    SandboxError (agent.errors)
     +-- SandboxRefused   the spec asks for what this server does not allow (not retryable)
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import docker.errors
import structlog

from agent.errors import SandboxError, SandboxRefused
from agent.models import SandboxSpec, TaskSpec
from agent.sandbox import PoolStats
from workers.sandbox.caps import refusal
from workers.sandbox.docker_attach import AttachChannel
from workers.sandbox.docker_config import (
    DEFAULT_IMAGE,
    LABEL_EXPIRES,
    LABEL_FLEET,
    LABEL_POOL,
    LABEL_SANDBOX,
    LABEL_TASK,
    LABEL_WORKER,
    ContainerRequest,
    Hardening,
    container_config,
)
from workers.sandbox.pool import WarmPool
from workers.sandbox.protocol import DEFAULT_GRACE_S, RunnerLost, SessionClient
from workers.sandbox.reaper import Reaper
from workers.sandbox.session import DEFAULT_SETUP_TIMEOUT_S, Exit, Session

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_IMAGE",
    "LABEL_EXPIRES",
    "LABEL_FLEET",
    "LABEL_POOL",
    "LABEL_SANDBOX",
    "LABEL_TASK",
    "LABEL_WORKER",
    "ContainerRequest",
    "DockerProvider",
    "DockerSandbox",
    "Hardening",
    "SandboxRefused",
    "container_config",
]

REAP_INTERVAL_S = 60.0


class _Engine:
    """The Docker engine as the backend uses it: one ``APIClient``, made on first use, and
    the calls that must not raise (removal, state)."""

    def __init__(
        self, client: docker.DockerClient | docker.APIClient | None, base_url: str | None
    ) -> None:
        self._client = client
        self._base_url = base_url
        self._api: docker.APIClient | None = None

    def api(self) -> docker.APIClient:
        if self._api is None:
            if isinstance(self._client, docker.DockerClient):
                self._api = self._client.api
            elif isinstance(self._client, docker.APIClient):
                self._api = self._client
            elif self._base_url is not None:
                self._api = docker.APIClient(base_url=self._base_url)
            else:
                self._api = docker.APIClient(**docker.utils.kwargs_from_env())
        return self._api

    def remove(self, container_id: str) -> None:
        """Remove (killing) a container; never raises: the reaper is the backstop."""
        try:
            self.api().remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: a removal is already in progress
                log.warning("sandbox.remove_failed", container=container_id, error=str(e))
        except Exception as e:
            log.warning("sandbox.remove_failed", container=container_id, error=repr(e))

    def state(self, container_id: str, wait_exit_s: float) -> dict[str, Any]:
        """The container's ``State``, waiting up to ``wait_exit_s`` for it to stop."""
        deadline = time.monotonic() + wait_exit_s
        while True:
            try:
                state: dict[str, Any] = self.api().inspect_container(container_id)["State"]
            except docker.errors.DockerException:
                return {}
            if not state.get("Running") or time.monotonic() >= deadline:
                return state
            time.sleep(0.05)


class _Container:
    """One running container with its runner session (``session.Box``)."""

    def __init__(
        self,
        engine: _Engine,
        container_id: str,
        name: str,
        request: ContainerRequest,
        channel: AttachChannel,
        client: SessionClient,
        expires_at: float,  # unix seconds (the label)
    ) -> None:
        self.engine = engine
        self.id = container_id
        self.name = name
        self.request = request
        self.channel = channel
        self.client = client
        self.expires_at = expires_at
        self._removed = False

    def stop(self, wait_s: float) -> Exit:
        state = self.engine.state(self.id, wait_s) if wait_s and not self._removed else {}
        self.kill()
        self.channel.close()
        if state.get("Running") or not state:
            return Exit(oom_killed=bool(state.get("OOMKilled")))
        return Exit(state.get("ExitCode"), oom_killed=bool(state.get("OOMKilled")))

    def kill(self) -> None:
        # Removing the container ends the attach stream: an execute in flight sees EOF.
        if not self._removed:
            self._removed = True
            self.engine.remove(self.id)

    def detail(self) -> str:
        return bytes(self.channel.stderr_tail[-2000:]).decode("utf-8", "replace")


class DockerProvider:
    """Starts ``DockerSandbox``es (``agent.sandbox.SandboxProvider``); owns the warm pool.

    The constructor does no I/O. ``start_pool()`` begins pre-starting containers for
    ``image`` with the default resources (``pool_min_size``..``pool_max_size``); ``start``
    takes one from the pool when the task's request matches (a hit) or starts one (a
    miss). ``close()`` stops the pool and the reaper and removes the pool's idle
    containers (not the sandboxes handed out: close those).

    ``fleet`` labels every container (``LABEL_FLEET``): the deployment it belongs to, so that
    a reaper removes only its own fleet's (``Settings.fleet``).
    ``client`` is a ``docker.DockerClient`` or ``docker.APIClient``; without one, an
    ``APIClient`` for ``base_url`` (default: the DOCKER_HOST environment) is made on first
    use. Expiry labels: a cold container expires ``expiry_grace_s`` after the task's
    ``limits.timeout_s``; a pooled one after ``pool_max_age_s + max_task_s``, and a task
    whose deadline is later than that gets a cold container instead.
    """

    backend = "docker"

    def __init__(
        self,
        *,
        worker_id: str,
        fleet: str,
        client: docker.DockerClient | docker.APIClient | None = None,
        base_url: str | None = None,
        image: str = DEFAULT_IMAGE,
        allowed_images: Iterable[str] = (),
        allow_network: bool = False,
        hardening: Hardening | None = None,
        pool_min_size: int = 0,
        pool_max_size: int = 4,
        pool_idle_ttl_s: float = 300.0,
        pool_max_age_s: float = 1800.0,
        max_task_s: float = 3600.0,
        expiry_grace_s: float = 300.0,
        start_timeout_s: float = 30.0,
        setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
        exec_grace_s: float = DEFAULT_GRACE_S,
        max_threads: int = 8,
    ) -> None:
        self.worker_id = worker_id
        self.fleet = fleet
        self.image = image
        self.allowed_images = frozenset(allowed_images) | {image}
        self.allow_network = allow_network
        self.hardening = hardening or Hardening()
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.pool_idle_ttl_s = pool_idle_ttl_s
        self.pool_max_age_s = pool_max_age_s
        self.max_task_s = max_task_s
        self.expiry_grace_s = expiry_grace_s
        self.start_timeout_s = start_timeout_s
        self.setup_timeout_s = setup_timeout_s
        self.exec_grace_s = exec_grace_s
        self._engine = _Engine(client, base_url)
        self._max_threads = max_threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pools: dict[ContainerRequest, WarmPool[_Container]] = {}
        self._network_ready = False
        self._reaper: Reaper | None = None
        self._host_cpus = float(os.cpu_count() or 1)

    # -- SandboxProvider ------------------------------------------------------------------

    def start(self, spec: TaskSpec, task_id: str) -> DockerSandbox:
        """A ready sandbox for ``task_id``: files written, ``setup_code`` run.

        Raises as ``agent.sandbox.SandboxProvider.start`` says (``SandboxRefused`` also for
        an image this server does not allow).
        """
        request = self.request_for(spec.sandbox)
        deadline = time.time() + spec.limits.timeout_s + self.expiry_grace_s
        box, hit = self._acquire(request, task_id, deadline)

        def relaunch() -> _Container:  # after a loss: the pool may serve it too
            later = max(deadline, time.time() + self.expiry_grace_s)
            return self._acquire(request, task_id, later)[0]

        sandbox = DockerSandbox(spec, task_id, box, relaunch, self.setup_timeout_s)
        sandbox.pool_hit = hit
        try:
            sandbox.prepare()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def start_pool(self) -> None:
        """Begin keeping warm containers for ``image`` with the default resources."""
        if self.pool_max_size <= 0:
            return
        request = self.request_for(SandboxSpec())
        with self._lock:
            if request in self._pools:
                return
            pool: WarmPool[_Container] = WarmPool(
                create=lambda: self._start_box(
                    request, "", time.time() + self.pool_max_age_s + self.max_task_s, True
                ),
                destroy=_discard,
                healthy=lambda box: box.channel.idle_ok(),
                min_size=self.pool_min_size,
                max_size=self.pool_max_size,
                idle_ttl_s=self.pool_idle_ttl_s,
                max_age_s=self.pool_max_age_s,
                name=request.image,
            )
            self._pools[request] = pool
        pool.start()

    def wait_pool_ready(self, timeout_s: float = 60.0) -> bool:
        """Block until every pool holds its ``min_size`` containers."""
        deadline = time.monotonic() + timeout_s
        return all(
            p.wait_ready(None, max(0.0, deadline - time.monotonic())) for p in self._pool_list()
        )

    def pool_stats(self) -> PoolStats:
        """Hits, misses, idle, starting... summed over the pools (one per image)."""
        return sum((p.stats() for p in self._pool_list()), PoolStats())

    def start_housekeeping(self, is_worker_alive: Callable[[str], bool]) -> int:
        """Remove this fleet's containers of dead workers and expired ones (``Reaper``) now,
        and every ``REAP_INTERVAL_S`` until ``close``; returns how many went now."""
        with self._lock:
            if self._reaper is None:
                self._reaper = Reaper(self._engine.api(), is_worker_alive, fleet=self.fleet)
            reaper = self._reaper
        reaped = reaper.reap_once()
        log.info("sandbox.reaped", backend=self.backend, containers=len(reaped))
        reaper.start(REAP_INTERVAL_S)
        return len(reaped)

    def close(self) -> None:
        """Stop the reaper and the pools, and remove the pools' idle containers."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            executor, self._executor = self._executor, None
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.stop()
        for pool in pools:
            pool.close()
        if executor is not None:
            executor.shutdown(wait=False)

    def request_for(self, sandbox: SandboxSpec) -> ContainerRequest:
        """Map a spec's ``sandbox`` section onto what this server allows."""
        image = sandbox.image or self.image
        if image not in self.allowed_images:
            raise SandboxRefused(f"sandbox.image {image!r} is not allowed on this server")
        hardening = self.hardening
        refused = refusal(sandbox, self.allow_network, hardening.max_memory_mb, hardening.max_cpus)
        if refused:
            raise SandboxRefused(refused)
        cpus = min(sandbox.cpus, self._host_cpus)  # no more than the host has
        return ContainerRequest(
            image=image, network=sandbox.network, memory_mb=sandbox.memory_mb, cpus=round(cpus, 2)
        )

    # -- internals ------------------------------------------------------------------------

    def _acquire(
        self, request: ContainerRequest, task_id: str, deadline: float
    ) -> tuple[_Container, bool]:
        """A container for ``request``: from its pool (True) or started now (False)."""
        pool = self._pools.get(request)
        box = pool.acquire(accept=lambda b: b.expires_at >= deadline) if pool else None
        if box is not None:
            self._threads().submit(self._rename, box, task_id)
            return box, True
        return self._start_box(request, task_id, deadline, False), False

    def _start_box(
        self, request: ContainerRequest, task_id: str, expires_at: float, pooled: bool
    ) -> _Container:
        api = self._engine.api()
        if request.network:
            self._ensure_network()
        name = _container_name(task_id, pooled)
        labels = {
            LABEL_SANDBOX: "1",
            LABEL_FLEET: self.fleet,
            LABEL_TASK: task_id,
            LABEL_WORKER: self.worker_id,
            LABEL_EXPIRES: str(int(expires_at)),
            LABEL_POOL: "1" if pooled else "0",
        }
        config = container_config(
            request, name=name, labels=labels, hardening=self.hardening, api=api
        )
        try:
            container_id = api.create_container(**config)["Id"]
        except docker.errors.ImageNotFound as e:
            raise SandboxError(
                f"sandbox image {request.image!r} not found: build it with sandbox_images/build.sh"
            ) from e
        except docker.errors.DockerException as e:
            raise SandboxError(f"could not create a sandbox container: {e}") from e
        channel: AttachChannel | None = None
        try:
            channel = AttachChannel(
                api.attach_socket(
                    container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
                )
            )
            api.start(container_id)
            client = SessionClient(channel, grace_s=self.exec_grace_s)
            client.wait_ready(self.start_timeout_s)
        except (docker.errors.DockerException, RunnerLost, OSError) as e:
            if channel is not None:
                channel.close()
            self._engine.remove(container_id)
            raise SandboxError(f"could not start a sandbox container: {e}") from e
        except BaseException:
            if channel is not None:
                channel.close()
            self._engine.remove(container_id)
            raise
        log.debug("sandbox.started", container=name, task_id=task_id, pooled=pooled)
        return _Container(self._engine, container_id, name, request, channel, client, expires_at)

    def _rename(self, box: _Container, task_id: str) -> None:
        """Name a pooled container after the task it now serves (labels are immutable)."""
        try:
            new_name = _container_name(task_id, False)
            self._engine.api().rename(box.id, new_name)
            box.name = new_name
        except Exception as e:  # cosmetic: the container works without it
            log.debug("sandbox.rename_failed", container=box.id, error=repr(e))

    def _ensure_network(self) -> None:
        with self._lock:
            if self._network_ready:
                return
            api = self._engine.api()
            name = self.hardening.network_name
            try:
                if not api.networks(names=[name]):
                    api.create_network(
                        name,
                        driver="bridge",
                        options={"com.docker.network.bridge.enable_icc": "false"},
                        labels={LABEL_SANDBOX: "network"},
                    )
            except docker.errors.DockerException as e:
                raise SandboxError(f"could not create the sandbox network {name!r}: {e}") from e
            self._network_ready = True

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_threads, "docker-sandbox")
            return self._executor

    def _pool_list(self) -> list[WarmPool[_Container]]:
        with self._lock:
            return list(self._pools.values())


class DockerSandbox(Session):
    """One task's session in a container (``session.Session``): after a loss, the next
    ``execute`` runs in a fresh container (``relaunch``) with the task re-applied."""

    backend = "docker"

    def __init__(
        self,
        spec: TaskSpec,
        task_id: str,
        box: _Container,
        relaunch: Callable[[], _Container],
        setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
    ) -> None:
        super().__init__(spec, task_id, box, setup_timeout_s=setup_timeout_s)
        self._relaunch = relaunch

    @property
    def container_id(self) -> str | None:
        """The current container's id (``None`` between a loss and the next execute)."""
        box = self._box
        return box.id if isinstance(box, _Container) else None

    def _launch(self) -> _Container:
        return self._relaunch()


def _discard(box: _Container) -> None:
    box.stop(0)


def _container_name(task_id: str, pooled: bool) -> str:
    if pooled or not task_id:
        return f"actfleet-pool-{secrets.token_hex(5)}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", task_id).strip("-.")[:48] or "task"
    return f"actfleet-{slug}-{secrets.token_hex(3)}"
