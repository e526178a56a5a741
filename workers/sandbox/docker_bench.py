"""``actfleet bench sandbox --backend docker``: ``bench.bench_sandbox`` on two Docker
providers, one without a warm pool (every start is cold: create + attach + start + runner
ready + first exec) and one with. Every container is removed afterwards.
"""

from __future__ import annotations

import os
from typing import Any

from agent.models import TaskSpec
from workers.sandbox.bench import bench_sandbox
from workers.sandbox.docker import DEFAULT_IMAGE, DockerProvider


def bench_docker(
    runs: int = 20,
    *,
    image: str = DEFAULT_IMAGE,
    base_url: str | None = None,
    worker_id: str | None = None,
    fleet: str | None = None,
    pool_size: int = 2,
) -> dict[str, Any]:
    """The figures of ``bench_sandbox``, warm acquires included. The containers are
    labelled ``fleet`` (default: a fleet of this bench run alone)."""
    worker_id = worker_id or f"bench-{os.getpid()}"
    fleet = fleet or worker_id
    cold = DockerProvider(
        worker_id=worker_id, fleet=fleet, base_url=base_url, image=image, pool_max_size=0
    )
    warm = DockerProvider(
        worker_id=worker_id,
        fleet=fleet,
        base_url=base_url,
        image=image,
        pool_min_size=pool_size,
        pool_max_size=pool_size,
    )
    try:
        report = bench_sandbox(cold, runs, TaskSpec(prompt="bench"), warm=warm)
    finally:
        cold.close()
        warm.close()
    report["image"] = image
    return report


if __name__ == "__main__":  # python -m workers.sandbox.docker_bench [runs]
    import json
    import sys

    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    print(json.dumps(bench_docker(int(sys.argv[1]) if len(sys.argv) > 1 else 20), indent=2))
