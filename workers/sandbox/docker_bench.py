"""``actfleet bench sandbox --backend docker``: cold start, warm acquire, exec round trip.

``bench_docker(runs)`` runs the backend-neutral ``bench.bench_sandbox`` on a provider with no
warm pool (so every start is cold: create + attach + start + runner ready + first exec),
then measures warm acquires on a provider with a pool: the time ``start`` takes to hand out
a pre-started container (no files, no setup_code), one per run, the pool refilled between
runs as it would be between tasks. Every container is removed afterwards.
"""

from __future__ import annotations

import os
import time
from typing import Any

from agent.models import TaskSpec
from workers.sandbox.bench import bench_sandbox, summarize_ms
from workers.sandbox.docker import DEFAULT_IMAGE, DockerProvider


def warm_acquire_samples(provider: DockerProvider, runs: int, spec: TaskSpec) -> list[float]:
    """Seconds per pool-served ``start``; raises if a start missed the pool."""
    provider.start_pool()
    samples = []
    for i in range(runs):
        if not provider.wait_pool_ready(timeout_s=60):
            raise RuntimeError("the warm pool did not fill within 60 s")
        started = time.perf_counter()
        sandbox = provider.start(spec, f"bench-warm-{i}")
        elapsed = time.perf_counter() - started
        try:
            if not sandbox.pool_hit:
                raise RuntimeError("a warm acquire missed the pool")
        finally:
            sandbox.close()
        samples.append(elapsed)
    return samples


def bench_docker(
    runs: int = 20,
    *,
    image: str = DEFAULT_IMAGE,
    base_url: str | None = None,
    worker_id: str | None = None,
    fleet: str | None = None,
    pool_size: int = 2,
) -> dict[str, Any]:
    """The figures of ``bench_sandbox`` plus ``warm_acquire_ms`` and the pool's stats.
    The containers are labelled ``fleet`` (default: a fleet of this bench run alone)."""
    worker_id = worker_id or f"bench-{os.getpid()}"
    fleet = fleet or worker_id
    spec = TaskSpec(prompt="bench")
    cold = DockerProvider(
        worker_id=worker_id, fleet=fleet, base_url=base_url, image=image, pool_max_size=0
    )
    try:
        report = bench_sandbox(cold, runs, spec)
    finally:
        cold.close()
    warm = DockerProvider(
        worker_id=worker_id,
        fleet=fleet,
        base_url=base_url,
        image=image,
        pool_min_size=pool_size,
        pool_max_size=pool_size,
    )
    try:
        report["warm_acquire_ms"] = summarize_ms(warm_acquire_samples(warm, runs, spec))
        stats = warm.pool_stats().get(image)
        if stats is not None:
            report["pool"] = {"hits": stats.hits, "misses": stats.misses}
    finally:
        warm.close()
    report["backend"] = "docker"
    report["image"] = image
    return report


if __name__ == "__main__":  # python -m workers.sandbox.docker_bench [runs]
    import json
    import sys

    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    print(json.dumps(bench_docker(int(sys.argv[1]) if len(sys.argv) > 1 else 20), indent=2))
