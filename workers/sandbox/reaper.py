"""The reaper: removes sandbox containers nobody will ever close.

A worker removes its own containers on every path it lives through; the reaper covers the
paths it does not (SIGKILL, a crashed host process, a lost Docker connection). It looks
only at labels (``docker_config.LABEL_*``), and only at the containers of its own fleet
(``actfleet.fleet``: another deployment on the same engine has its own workers, unknown to
this one's Redis), so any worker of a fleet can reap its other workers' leftovers:

- expired: ``actfleet.expires`` is in the past (a backstop for any leak, even a live
  worker's);
- orphaned: ``actfleet.worker`` names a worker that ``is_worker_alive`` says is gone (the
  lead backs it with the Redis heartbeat), and the container is older than ``min_age_s``
  (so a worker that has not written its first heartbeat yet is not mistaken for dead).

Run ``reap_once()`` at worker start and ``start(interval_s)`` for a periodic pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import structlog

from workers.sandbox.docker_config import (
    LABEL_EXPIRES,
    LABEL_FLEET,
    LABEL_SANDBOX,
    LABEL_TASK,
    LABEL_WORKER,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reaped:
    container_id: str
    name: str
    worker: str
    task: str
    reason: str  # "expired" | "worker_dead"


class Reaper:
    """Removes expired containers and containers of dead workers of ``fleet``, by label."""

    def __init__(
        self,
        client: docker.DockerClient | docker.APIClient,
        is_worker_alive: Callable[[str], bool],
        *,
        fleet: str,
        min_age_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api: docker.APIClient = (
            client.api if isinstance(client, docker.DockerClient) else client
        )
        self._is_worker_alive = is_worker_alive
        self.fleet = fleet
        self.min_age_s = min_age_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.removed_total = 0

    def reap_once(self) -> list[Reaped]:
        """One pass; returns what it removed. Docker errors are logged, not raised."""
        try:
            containers = self._api.containers(
                all=True, filters={"label": [LABEL_SANDBOX, f"{LABEL_FLEET}={self.fleet}"]}
            )
        except docker.errors.DockerException as e:
            log.warning("reaper.list_failed", error=str(e))
            return []
        now = self._clock()
        alive: dict[str, bool] = {}
        reaped = []
        for c in containers:
            reason = self._verdict(c, now, alive)
            if reason is None:
                continue
            labels = c.get("Labels") or {}
            names = c.get("Names") or [""]
            item = Reaped(
                container_id=c["Id"],
                name=names[0].lstrip("/"),
                worker=labels.get(LABEL_WORKER, ""),
                task=labels.get(LABEL_TASK, ""),
                reason=reason,
            )
            if self._remove(item.container_id):
                reaped.append(item)
                log.info(
                    "sandbox.reaped",
                    container=item.name,
                    worker=item.worker,
                    task_id=item.task,
                    reason=reason,
                )
        self.removed_total += len(reaped)
        return reaped

    def start(self, interval_s: float = 60.0) -> None:
        """Reap every ``interval_s`` on a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="sandbox-reaper", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reap_once()
            except Exception as e:  # the next pass tries again
                log.warning("reaper.pass_failed", error=repr(e))

    def _verdict(self, c: dict[str, Any], now: float, alive: dict[str, bool]) -> str | None:
        labels = c.get("Labels") or {}
        if labels.get(LABEL_FLEET) != self.fleet:  # the filter already says so: belt and braces
            return None
        try:
            expires = float(labels.get(LABEL_EXPIRES) or "inf")
        except ValueError:
            expires = 0.0  # unreadable: treat as expired
        if expires < now:
            return "expired"
        worker = labels.get(LABEL_WORKER, "")
        if now - float(c.get("Created") or 0) < self.min_age_s:
            return None
        if not worker:
            return "worker_dead"
        if worker not in alive:
            try:
                alive[worker] = bool(self._is_worker_alive(worker))
            except Exception as e:  # unknown: keep the container this pass
                log.warning("reaper.liveness_failed", worker=worker, error=repr(e))
                alive[worker] = True
        return None if alive[worker] else "worker_dead"

    def _remove(self, container_id: str) -> bool:
        try:
            self._api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            return False
        except docker.errors.DockerException as e:
            log.warning("reaper.remove_failed", container=container_id, error=str(e))
            return False
        return True
