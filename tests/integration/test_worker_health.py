"""The worker's health server over real HTTP: what liveness and readiness probes get."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from workers.health import HealthServer


@pytest.fixture
def served() -> Iterator[tuple[dict[str, Any], str]]:
    facts: dict[str, Any] = {"consumer": "ok", "redis": "ok", "draining": False}
    registry = CollectorRegistry()
    Counter("actfleet_probe_test_total", "a metric", registry=registry).inc()
    server = HealthServer(0, lambda: dict(facts), registry, host="127.0.0.1").start()
    yield facts, f"http://127.0.0.1:{server.port}"
    server.close()


def codes(url: str) -> tuple[int, int]:
    return httpx.get(f"{url}/healthz").status_code, httpx.get(f"{url}/readyz").status_code


def test_a_healthy_worker_is_live_and_ready_and_serves_its_metrics(
    served: tuple[dict[str, Any], str],
) -> None:
    facts, url = served
    assert codes(url) == (200, 200)
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", **facts}
    assert "actfleet_probe_test_total 1.0" in httpx.get(f"{url}/metrics").text


def test_a_dead_consumer_fails_both_probes(served: tuple[dict[str, Any], str]) -> None:
    facts, url = served
    facts["consumer"] = "stalled"
    assert codes(url) == (503, 503)
    assert httpx.get(f"{url}/healthz").json()["status"] == "unavailable"


def test_redis_down_or_draining_is_not_ready_but_still_live(
    served: tuple[dict[str, Any], str],
) -> None:
    # restarting a worker brings neither Redis back nor its tasks to an end sooner
    facts, url = served
    facts["redis"] = "unavailable"
    assert codes(url) == (200, 503)
    facts["redis"], facts["draining"] = "ok", True
    assert codes(url) == (200, 503)
