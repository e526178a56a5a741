"""Shared fixtures: a real ``redis-server`` per test (or per session), never a mock.

The server listens on a free port with its data in a temp dir, persistence as in production
(AOF ``everysec``, no RDB snapshots), and is killed when the test ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from actfleet.stack import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]


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
