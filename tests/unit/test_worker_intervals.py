"""The worker's two periods: the heartbeat (a constant every worker shares, well inside the
lease TTL) and the sweep (``ACTFLEET_SWEEP_INTERVAL_S``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from config.settings import Settings
from store.celery_app import make_celery
from store.keys import HEARTBEAT_INTERVAL_S, LEASE_TTL_S, WORKER_TTL_S
from workers.worker import WorkerRuntime


def runtime(settings: Settings) -> WorkerRuntime:
    # the constructor does no I/O: nothing listens on this URL
    return WorkerRuntime(settings, make_celery(settings.redis_url))


def test_the_sweeper_runs_at_the_sweep_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given ACTFLEET_SWEEP_INTERVAL_S in the environment
    monkeypatch.setenv("ACTFLEET_SWEEP_INTERVAL_S", "1.5")
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    # When a worker runtime is built from the settings
    rt = runtime(settings)
    # Then its sweeper runs that often, and the heartbeat keeps its own period
    assert rt.sweeper.interval_s == 1.5
    assert rt.heartbeat.interval_s == HEARTBEAT_INTERVAL_S


def test_the_heartbeat_renews_several_times_within_a_lease() -> None:
    assert Settings().sweep_interval_s == 5.0
    assert min(LEASE_TTL_S, WORKER_TTL_S) >= 3 * HEARTBEAT_INTERVAL_S


@pytest.mark.parametrize("value", ["0", "-1", "61", "soon"])
def test_a_sweep_interval_out_of_range_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ACTFLEET_SWEEP_INTERVAL_S", value)
    with pytest.raises(ValidationError, match="sweep_interval_s"):
        Settings()
