"""The Docker sandbox backend: one disposable, hardened container per task.

Each sandbox is one container running the image's runner (``sandbox_images/python``) as its
entry point. The host talks to it over the container's attached stdin/stdout (one attach
socket for the container's life, no ``docker exec`` per step), with the shared
``RunnerClient``. Every container is hardened the same way (``container_config``): no
network unless the task asks and the server allows it, a read-only root with size-capped
tmpfs at /work and /tmp, all capabilities dropped, no-new-privileges, Docker's default
seccomp profile, pids/memory(=memory+swap)/CPU limits, file-size and open-file ulimits, a
capped log, a non-root user, an init process, no mounts, an empty environment and labels
naming the fleet, the task, the worker and an expiry time. Nothing here is chosen by the model: the
task spec's ``sandbox`` section picks an allowed image and resources within server caps.

Lifecycle: ``DockerSandbox.close`` removes the container on every path; an execution that
will not stop by ``timeout_s + grace`` gets its container killed (``state_lost``), an
out-of-memory kill is read from the container's state, and the next ``execute`` starts a
fresh container with the task's files and ``setup_code`` re-applied. Containers a worker
failed to remove (it was SIGKILLed, say) are removed by ``reaper.Reaper``, by label.

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
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import structlog

from agent.errors import SandboxError, SandboxRefused, SetupError
from agent.models import SandboxSpec, TaskSpec
from agent.sandbox import ExecResult
from workers.sandbox.caps import over_caps
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
from workers.sandbox.pool import PoolStats, WarmPool
from workers.sandbox.protocol import (
    RunnerClient,
    RunnerDeadline,
    RunnerLost,
    RunnerProtocolError,
)

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

EXIT_OUT_OF_MEMORY = 86  # the runner's own exit status after a MemoryError it can't report


@dataclass(eq=False)
class _Box:
    """One running container with its runner session."""

    id: str
    name: str
    request: ContainerRequest
    channel: AttachChannel
    runner: RunnerClient
    expires_at: float  # unix seconds (the label)
    pooled: bool = False
    removed: bool = field(default=False)


class DockerProvider:
    """Starts ``DockerSandbox``es (``agent.sandbox.SandboxProvider``); owns the warm pool.

    The constructor does no I/O. ``start_pool()`` begins pre-starting containers for
    ``image`` with the default resources (``pool_min_size``..``pool_max_size``); ``start``
    takes one from the pool when the task's request matches (a hit) or starts one (a
    miss); ``start_async`` does the same on a thread, to overlap with the first LLM call.
    ``close()`` stops the pool and removes its idle containers (not the sandboxes handed
    out: close those).

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
        setup_timeout_s: float = 120.0,
        exec_grace_s: float = 1.0,
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
        self._client = client
        self._base_url = base_url
        self._api_client: docker.APIClient | None = None
        self._max_threads = max_threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pools: dict[ContainerRequest, WarmPool[_Box]] = {}
        self._network_ready = False
        self.hits = 0  # starts served by the warm pool
        self.misses = 0  # starts that made a container on the spot

    # -- SandboxProvider ------------------------------------------------------------------

    def start(self, spec: TaskSpec, task_id: str) -> DockerSandbox:
        """A ready sandbox for ``task_id``: files written, ``setup_code`` run.

        Raises ``SetupError`` if setup_code failed, ``SandboxRefused`` if the spec asks for
        something not allowed, ``SandboxError`` if no container could be started.
        """
        request = self.request_for(spec.sandbox)
        deadline = time.time() + spec.limits.timeout_s + self.expiry_grace_s
        started = time.perf_counter()
        box, hit = self._acquire(request, task_id, deadline)
        sandbox = DockerSandbox(self, spec, task_id, box, deadline)
        sandbox.pool_hit = hit
        sandbox.acquire_s = time.perf_counter() - started
        try:
            sandbox.prepare()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def start_async(self, spec: TaskSpec, task_id: str) -> Future[DockerSandbox]:
        """``start`` on the provider's threads: call it before the first LLM call and take
        ``.result()`` when the first code block arrives."""
        return self._threads().submit(self.start, spec, task_id)

    # -- pool -----------------------------------------------------------------------------

    def start_pool(self) -> None:
        """Begin keeping warm containers for ``image`` with the default resources."""
        if self.pool_max_size <= 0:
            return
        request = self.request_for(SandboxSpec())
        with self._lock:
            if request in self._pools:
                return
            pool: WarmPool[_Box] = WarmPool(
                create=lambda: self._start_box(
                    request, "", time.time() + self.pool_max_age_s + self.max_task_s, True
                ),
                destroy=self._dispose,
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

    def pool_stats(self) -> dict[str, PoolStats]:
        """Per image: hits, misses, idle, starting... (``provider.hits``/``misses`` also
        count starts that no pool could serve)."""
        return {p.name: p.stats() for p in self._pool_list()}

    def close(self) -> None:
        """Stop the pools and remove their idle containers."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            executor, self._executor = self._executor, None
        for pool in pools:
            pool.close()
        if executor is not None:
            executor.shutdown(wait=False)

    # -- internals used by DockerSandbox --------------------------------------------------

    def request_for(self, sandbox: SandboxSpec) -> ContainerRequest:
        """Map a spec's ``sandbox`` section onto what this server allows."""
        image = sandbox.image or self.image
        if image not in self.allowed_images:
            raise SandboxRefused(f"sandbox.image {image!r} is not allowed on this server")
        if sandbox.network and not self.allow_network:
            raise SandboxRefused("sandbox.network: this server does not allow network access")
        refused = over_caps(
            TaskSpec(prompt="", sandbox=sandbox),
            self.hardening.max_memory_mb,
            self.hardening.max_cpus,
        )
        if refused:
            raise SandboxRefused(refused)
        cpus = min(sandbox.cpus, float(os.cpu_count() or 1))  # no more than the host has
        return ContainerRequest(
            image=image, network=sandbox.network, memory_mb=sandbox.memory_mb, cpus=round(cpus, 2)
        )

    def _acquire(
        self, request: ContainerRequest, task_id: str, deadline: float
    ) -> tuple[_Box, bool]:
        pool = self._pools.get(request)
        box = pool.acquire(accept=lambda b: b.expires_at >= deadline) if pool else None
        with self._lock:
            if box is not None:
                self.hits += 1
            else:
                self.misses += 1
        if box is not None:
            self._threads().submit(self._rename, box, task_id)
            return box, True
        return self._start_box(request, task_id, deadline, False), False

    def _start_box(
        self, request: ContainerRequest, task_id: str, expires_at: float, pooled: bool
    ) -> _Box:
        api = self._api()
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
            runner = RunnerClient(channel, grace_s=self.exec_grace_s)
            runner.wait_ready(self.start_timeout_s)
        except (docker.errors.DockerException, RunnerLost, OSError) as e:
            if channel is not None:
                channel.close()
            self._remove(container_id)
            raise SandboxError(f"could not start a sandbox container: {e}") from e
        except BaseException:
            if channel is not None:
                channel.close()
            self._remove(container_id)
            raise
        log.debug("sandbox.started", container=name, task_id=task_id, pooled=pooled)
        return _Box(container_id, name, request, channel, runner, expires_at, pooled)

    def _dispose(self, box: _Box) -> None:
        """Remove the container (killing it) and close our end. Idempotent, never raises."""
        if not box.removed:
            box.removed = True
            self._remove(box.id)
        box.channel.close()

    def _remove(self, container_id: str) -> None:
        try:
            self._api().remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: a removal is already in progress
                log.warning("sandbox.remove_failed", container=container_id, error=str(e))
        except Exception as e:  # the reaper is the backstop
            log.warning("sandbox.remove_failed", container=container_id, error=repr(e))

    def _state(self, box: _Box, wait_exit_s: float) -> dict[str, Any]:
        """The container's ``State``, waiting up to ``wait_exit_s`` for it to stop."""
        deadline = time.monotonic() + wait_exit_s
        while True:
            try:
                state: dict[str, Any] = self._api().inspect_container(box.id)["State"]
            except docker.errors.DockerException:
                return {}
            if not state.get("Running") or time.monotonic() >= deadline:
                return state
            time.sleep(0.05)

    def _rename(self, box: _Box, task_id: str) -> None:
        """Name a pooled container after the task it now serves (labels are immutable)."""
        try:
            new_name = _container_name(task_id, False)
            self._api().rename(box.id, new_name)
            box.name = new_name
        except Exception as e:  # cosmetic: the container works without it
            log.debug("sandbox.rename_failed", container=box.id, error=repr(e))

    def _ensure_network(self) -> None:
        with self._lock:
            if self._network_ready:
                return
            api = self._api()
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

    def _api(self) -> docker.APIClient:
        if self._api_client is None:
            if isinstance(self._client, docker.DockerClient):
                self._api_client = self._client.api
            elif isinstance(self._client, docker.APIClient):
                self._api_client = self._client
            elif self._base_url is not None:
                self._api_client = docker.APIClient(base_url=self._base_url)
            else:
                self._api_client = docker.APIClient(**docker.utils.kwargs_from_env())
        return self._api_client

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_threads, "docker-sandbox")
            return self._executor

    def _pool_list(self) -> list[WarmPool[_Box]]:
        with self._lock:
            return list(self._pools.values())


class DockerSandbox:
    """One task's session in a container (``agent.sandbox.Sandbox``).

    ``execute`` calls are serialised. After the container was lost (killed at a timeout,
    out of memory, died) the next ``execute`` transparently starts a fresh one with the
    task's files and setup_code re-applied. ``close`` is idempotent and thread-safe; an
    ``execute`` in flight then returns promptly with ``state_lost=True``.
    """

    def __init__(
        self, provider: DockerProvider, spec: TaskSpec, task_id: str, box: _Box, deadline: float
    ) -> None:
        self._provider = provider
        self._spec = spec
        self.task_id = task_id
        self._deadline = deadline
        self._box: _Box | None = box
        self._exec_lock = threading.Lock()
        self._box_lock = threading.Lock()
        self._closed = False
        self.pool_hit = False
        self.acquire_s = 0.0
        self.restarts = 0

    @property
    def container_id(self) -> str | None:
        """The current container's id (``None`` between a loss and the next execute)."""
        box = self._box
        return box.id if box is not None else None

    def prepare(self) -> None:
        """Write the task's files and run its setup_code in the current container."""
        with self._exec_lock:
            box = self._box
            if box is None:
                raise SandboxError("the sandbox is closed")
            self._apply(box)

    def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
        with self._exec_lock:
            if self._closed:
                return _closed_result()
            box = self._box
            if box is None:
                try:
                    box = self._restart()
                except SetupError as e:
                    return ExecResult(
                        error=str(e),
                        state_lost=True,
                        note="The sandbox was restarted but the task's setup code failed.",
                    )
                if box is None:
                    return _closed_result()
            started = time.perf_counter()
            try:
                return box.runner.execute(code, timeout_s, max_output_chars)
            except RunnerLost as e:
                duration = time.perf_counter() - started
                note = self._lost(box, e, timeout_s)
                return ExecResult(
                    timed_out=isinstance(e, RunnerDeadline),
                    state_lost=True,
                    note=note,
                    duration_s=round(duration, 6),
                )

    def close(self) -> None:
        with self._box_lock:
            if self._closed:
                return
            self._closed = True
            box, self._box = self._box, None
        if box is None:
            return
        # Removing the container ends the attach stream, so an execute in flight sees EOF
        # and returns; it closes the channel itself. Otherwise close it here.
        box.removed = True
        self._provider._remove(box.id)
        if self._exec_lock.acquire(blocking=False):
            try:
                box.channel.close()
            finally:
                self._exec_lock.release()
        log.debug("sandbox.closed", container=box.name, task_id=self.task_id)

    # -- internals ------------------------------------------------------------------------

    def _apply(self, box: _Box) -> None:
        try:
            for f in self._spec.files:
                box.runner.put_file(f.path, f.content())
        except ValueError as e:
            raise SetupError(f"files: {e}") from e
        except RunnerLost as e:
            raise SetupError(f"files: the sandbox died while writing them: {e}") from e
        code = self._spec.setup_code
        if not code:
            return
        timeout_s = max(self.setup_timeout_s, self._spec.limits.exec_timeout_s)
        try:
            result = box.runner.execute(code, timeout_s, self._spec.limits.max_output_chars)
        except RunnerLost as e:
            raise SetupError(f"setup_code: {self._lost(box, e, timeout_s)}") from e
        if result.error is not None or result.timed_out:
            raise SetupError(f"setup_code failed:\n{result.error or 'timed out'}")

    @property
    def setup_timeout_s(self) -> float:
        return self._provider.setup_timeout_s

    def _restart(self) -> _Box | None:
        provider = self._provider
        request = provider.request_for(self._spec.sandbox)
        deadline = max(self._deadline, time.time() + provider.expiry_grace_s)
        box, _ = provider._acquire(request, self.task_id, deadline)
        with self._box_lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._box = box
        if closed:
            provider._dispose(box)
            return None
        self.restarts += 1
        try:
            self._apply(box)
        except SetupError:
            with self._box_lock:
                if self._box is box:
                    self._box = None
            provider._dispose(box)
            raise
        log.info("sandbox.restarted", container=box.name, task_id=self.task_id)
        return box

    def _lost(self, box: _Box, error: RunnerLost, timeout_s: float) -> str:
        """Dispose of a container whose runner can't go on; say why, for the model."""
        with self._box_lock:
            if self._box is box:
                self._box = None
            closed = self._closed
        provider = self._provider
        if closed:
            provider._dispose(box)
            return "The sandbox was closed while the code ran."
        state: dict[str, Any] = {}
        if not isinstance(error, RunnerDeadline | RunnerProtocolError):
            state = provider._state(box, wait_exit_s=2.0)
        provider._dispose(box)
        after = (
            "Variables and imports from earlier steps are gone; the next execution runs in a "
            "fresh session with the task's files and setup code re-applied."
        )
        if isinstance(error, RunnerDeadline):
            why = (
                f"The code did not stop at its {timeout_s:g} s time limit, "
                "so the sandbox was killed."
            )
        elif state.get("OOMKilled") or state.get("ExitCode") == EXIT_OUT_OF_MEMORY:
            why = (
                f"The code ran out of memory (limit {box.request.memory_mb} MB) "
                "and the sandbox was killed."
            )
        elif isinstance(error, RunnerProtocolError):
            why = "The sandbox's runner stopped answering properly and was killed."
        else:
            code = state.get("ExitCode")
            why = "The sandbox process exited" + (f" (exit code {code})." if code else ".")
        log.info(
            "sandbox.lost",
            container=box.name,
            task_id=self.task_id,
            reason=type(error).__name__,
            oom=bool(state.get("OOMKilled")),
            stderr=bytes(box.channel.stderr_tail[-500:]).decode("utf-8", "replace"),
        )
        return f"{why} {after}"


def _closed_result() -> ExecResult:
    return ExecResult(state_lost=True, note="The sandbox was closed.")


def _container_name(task_id: str, pooled: bool) -> str:
    if pooled or not task_id:
        return f"actfleet-pool-{secrets.token_hex(5)}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", task_id).strip("-.")[:48] or "task"
    return f"actfleet-{slug}-{secrets.token_hex(3)}"
