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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from agent.errors import ActfleetError

# How long a stopping worker may take: its default shutdown grace (30 s), the time it
# gives its threads after the hand-backs (15 s), and some margin.
WORKER_STOP_S = 60.0


class StackError(ActfleetError):
    """A piece of the local stack did not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], object], timeout_s: float, what: str, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise StackError(f"{what} did not become ready within {timeout_s:g}s")


class RedisServer:
    """A private ``redis-server`` with AOF (everysec, no RDB) in ``data_dir``, on a free
    port; ``start()`` again after it stopped keeps the port and the AOF."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("redis-server is not installed (apt-get install redis-server)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--protected-mode",
                "yes",
                "--maxclients",
                "10000",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            wait_until(client.ping, 10, "redis-server", self.proc)
        finally:
            client.close()
        return self

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
    log_to_console: bool = False
    _tmp: tempfile.TemporaryDirectory | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def metrics_dir(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "metrics"

    def child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env["ACTFLEET_REDIS_URL"] = self.redis_url or ""
        # The API's /metrics aggregates every process's files in here (prometheus_client
        # multiprocess mode), so the workers' counters show up on the API.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        env.setdefault("ACTFLEET_LOG_FORMAT", "json")
        return env

    def start(self) -> LocalStack:
        if self.state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="actfleet-")
            self.state_dir = Path(self._tmp.name)
        self.log_dir = self.log_dir or self.state_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        try:
            if self.redis_url is None:
                self.redis = RedisServer(self.state_dir / "redis").start()
                self.redis_url = self.redis.url
            self.api_port = self.api_port or free_port()
            api = self._spawn("api", ["api", "--host", self.api_host, "--port", str(self.api_port)])
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
        proc = self._spawn(f"worker-{n}", ["worker", "--concurrency", str(self.concurrency)])
        self.worker_procs.append(proc)
        return proc

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        assert self.log_dir is not None
        if self.log_to_console:
            proc = subprocess.Popen([sys.executable, "-m", "actfleet", *args], env=self.child_env())
        else:
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
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

    def check(self) -> None:
        """Raise if a child process has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                name = " ".join(str(a) for a in proc.args[3:5])  # type: ignore[index]
                raise StackError(f"`actfleet {name}` exited with status {proc.returncode}")

    def stop(self) -> None:
        """SIGTERM every worker at once (each finishes or hands back its tasks within its
        grace, see ``WorkerRuntime.drain``), then the API; SIGKILL what outlasts that."""
        from prometheus_client.multiprocess import mark_process_dead

        workers = [p for p in self.procs if p in self.worker_procs]
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            _reap(proc, WORKER_STOP_S)
        for proc in [*workers, *(p for p in reversed(self.procs) if p not in workers)]:
            _terminate(proc)
            if self.state_dir is not None:
                mark_process_dead(proc.pid, str(self.metrics_dir))
        self.procs.clear()
        self.worker_procs.clear()
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
    _reap(proc, timeout_s)


def _reap(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for ``proc`` to exit; SIGKILL it after ``timeout_s``."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
