"""Sandbox latency benchmark: cold start to first result, and exec round trip.

``bench_sandbox(provider)`` works with any ``SandboxProvider``. A provider with a warm pool
may expose ``warm_acquire_bench(runs) -> list[float]`` (seconds to hand out a ready
sandbox, one per run); its figures then appear under ``"warm_acquire_ms"``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from agent.models import TaskSpec
from agent.sandbox import SandboxProvider

BENCH_CODE = "print(1)"


def summarize_ms(samples_s: list[float]) -> dict[str, float]:
    """p50 / p95 / mean / min / max of samples given in seconds, in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    p95_index = min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))
    return {
        "p50": round(statistics.median(ms), 3),
        "p95": round(ms[p95_index], 3),
        "mean": round(statistics.fmean(ms), 3),
        "min": round(ms[0], 3),
        "max": round(ms[-1], 3),
    }


def bench_sandbox(
    provider: SandboxProvider, runs: int = 50, spec: TaskSpec | None = None
) -> dict[str, Any]:
    """Measure ``runs`` cold starts (``start`` + first ``execute("print(1)")``; ``close`` is
    not timed) and ``runs`` exec round trips on one started sandbox. JSON-able result."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    spec = spec or TaskSpec(prompt="bench")
    cold: list[float] = []
    for i in range(runs):
        started = time.perf_counter()
        sandbox = provider.start(spec, f"bench-cold-{i}")
        try:
            result = sandbox.execute(BENCH_CODE, 10.0, 2000)
            cold.append(time.perf_counter() - started)
        finally:
            sandbox.close()
        _check(result.stdout)
    roundtrip: list[float] = []
    sandbox = provider.start(spec, "bench-exec")
    try:
        sandbox.execute(BENCH_CODE, 10.0, 2000)  # warm-up
        for _ in range(runs):
            started = time.perf_counter()
            result = sandbox.execute(BENCH_CODE, 10.0, 2000)
            roundtrip.append(time.perf_counter() - started)
            _check(result.stdout)
    finally:
        sandbox.close()
    report: dict[str, Any] = {
        "backend": getattr(provider, "backend", type(provider).__name__),
        "runs": runs,
        "cold_start_ms": summarize_ms(cold),
        "exec_roundtrip_ms": summarize_ms(roundtrip),
    }
    # Extension point: providers with a warm pool report how fast they hand one out.
    warm_acquire = getattr(provider, "warm_acquire_bench", None)
    if callable(warm_acquire):
        report["warm_acquire_ms"] = summarize_ms(list(warm_acquire(runs)))
    return report


def _check(stdout: str) -> None:
    if stdout != "1\n":
        raise RuntimeError(f"the sandbox answered {stdout!r} to {BENCH_CODE!r}")
