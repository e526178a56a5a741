"""The whole stack on one machine: a private redis-server, the API and worker processes.

Used by ``actfleet up``, ``actfleet bench fleet`` and the end-to-end tests, so that all of
them run the same real processes. Each piece is a child process; ``stop`` (or leaving the
context) terminates them in order and waits for them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from agent.errors import ActfleetError


class StackError(ActfleetError):
    """A piece of the local stack did not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: object, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode} while starting")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the reason
            pass
        time.sleep(0.05)
    raise StackError(f"{what} did not become ready within {timeout_s:g}s")


@dataclass
class RedisServer:
    """A private ``redis-server`` with AOF (everysec) in ``data_dir``, on a free port."""

    data_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        if shutil.which("redis-server") is None:
            raise StackError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--protected-mode", "yes",
                "--maxclients", "10000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, 10, "redis-server", self.proc)
        client.close()
        return self.url

    def stop(self) -> None:
        _terminate(self.proc)


@dataclass
class LocalStack:
    """redis (unless ``redis_url`` is given), one API process and ``workers`` worker
    processes, each running ``concurrency`` agent loops."""

    redis_url: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 0
    workers: int = 1
    concurrency: int = 50
    env: Mapping[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    log_dir: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker_procs: list[subprocess.Popen] = field(default_factory=list)
    redis: RedisServer | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env["ACTFLEET_REDIS_URL"] = self.redis_url or ""
        env.setdefault("ACTFLEET_LOG_FORMAT", "json")
        return env

    def start(self) -> LocalStack:
        if self.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="actfleet-")
            self.state_dir = Path(self._tmp.name)
        self.log_dir = self.log_dir or self.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.redis_url is None:
                self.redis = RedisServer(self.state_dir / "redis")
                self.redis_url = self.redis.start()
            self.api_port = self.api_port or free_port()
            api = self._spawn(
                "api", ["api", "--host", self.api_host, "--port", str(self.api_port)]
            )
            for _ in range(self.workers):
                self.start_worker()
            wait_until(
                lambda: httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200,
                30,
                "the API",
                api,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self) -> subprocess.Popen:
        n = len(self.worker_procs)
        proc = self._spawn(
            f"worker-{n}", ["worker", "--concurrency", str(self.concurrency)]
        )
        self.worker_procs.append(proc)
        return proc

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        assert self.log_dir is not None
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "actfleet", *args],
            env=self.child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _terminate(proc)
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
