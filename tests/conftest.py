"""Shared fixtures: a real ``redis-server`` per test (or per session), never a mock.

The server listens on a free port with its data in a temp dir, persistence as in production
(AOF ``everysec``, no RDB snapshots), and is killed when the test ends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from actfleet import stack
from actfleet.stack import free_port

__all__ = ["RedisServer", "free_port"]


class RedisServer(stack.RedisServer):
    """``actfleet up``'s private redis-server, plus the crash the tests model: ``kill()``
    (SIGKILL, no shutdown save) and ``restart()`` on the same port and AOF."""

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()


NETGUARD_DIR = Path(__file__).with_name("netguard")


def pytest_configure(config: pytest.Config) -> None:
    """Enforce the network rule in this process and in every Python process a test starts
    (see ``tests/netguard/guard.py``); the session fails if any of them broke it."""
    from tests.netguard import guard

    fd, log = tempfile.mkstemp(prefix="actfleet-netguard-", suffix=".log")
    os.close(fd)
    os.environ["ACTFLEET_NETGUARD"] = "1"
    os.environ[guard.LOG_ENV] = log
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(NETGUARD_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    guard.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests.netguard import guard

    log = Path(os.environ.get(guard.LOG_ENV, ""))
    if not log.is_file():
        return
    text = log.read_text()
    log.unlink()
    if text.strip():
        print("\nNETWORK RULE VIOLATIONS (a test tried to reach a non-loopback address):\n" + text)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_url_session(redis_server_session: RedisServer) -> str:
    """One server for the whole session; tests must use their own key prefix or flush."""
    return redis_server_session.url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.data_dir.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a fresh, empty redis-server owned by this test."""
    return redis_server.url
