"""Sandbox latency benchmark: cold start to first result, warm acquire, exec round trip.

``bench_sandbox(provider, warm=...)`` works with any ``SandboxProvider``: cold starts on
``provider`` (made without a pool, so every start is cold), and, given a second provider
``warm`` made with a pool, the time its ``start`` takes to hand out a pre-started sandbox
(no files, no setup_code), one per run, the pool refilled between runs as it would be
between tasks; its figures then appear under ``"warm_acquire_ms"``.

Given ``cpu_s`` (a clock of the CPU seconds this process and its descendants have used,
reaped ones included: ``actfleet.proctime``), it also starts ``runs`` sandboxes side by side
and closes them, and reports what each start and each close cost in CPU
(``"cpu_ms_per_start"``, ``"cpu_ms_per_close"``): the sandbox's processes and the
worker's own work for them together, which is what a fleet pays per task.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from agent.models import TaskSpec
from agent.sandbox import SandboxProvider

BENCH_CODE = "print(1)"
POOL_FILL_TIMEOUT_S = 60.0


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
    provider: SandboxProvider,
    runs: int = 50,
    spec: TaskSpec | None = None,
    *,
    warm: SandboxProvider | None = None,
    cpu_s: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Measure ``runs`` cold starts (``start`` + first ``execute("print(1)")``; ``close`` is
    not timed), ``runs`` exec round trips on one started sandbox and, with ``warm``,
    ``runs`` warm acquires and its pool's hits and misses. JSON-able result."""
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
        "backend": provider.backend,
        "runs": runs,
        "cold_start_ms": summarize_ms(cold),
        "exec_roundtrip_ms": summarize_ms(roundtrip),
    }
    if cpu_s is not None:
        report.update(cpu_per_start(provider, runs, spec, cpu_s))
    if warm is not None:
        report["warm_acquire_ms"] = summarize_ms(warm_acquire_samples(warm, runs, spec))
        stats = warm.pool_stats()
        report["pool"] = {"hits": stats.hits, "misses": stats.misses}
    return report


def cpu_per_start(
    provider: SandboxProvider, runs: int, spec: TaskSpec, cpu_s: Callable[[], float]
) -> dict[str, float]:
    """CPU milliseconds per start (to ready, no code run) and per close, averaged over
    ``runs`` sandboxes started one after the other and held open, then closed."""
    sandboxes = []
    try:
        before = cpu_s()
        for i in range(runs):
            sandboxes.append(provider.start(spec, f"bench-cpu-{i}"))
        started = cpu_s()
    finally:
        for sandbox in sandboxes:
            sandbox.close()
    closed = cpu_s()
    return {
        "cpu_ms_per_start": round((started - before) * 1000 / runs, 3),
        "cpu_ms_per_close": round((closed - started) * 1000 / runs, 3),
    }


def warm_acquire_samples(provider: SandboxProvider, runs: int, spec: TaskSpec) -> list[float]:
    """Seconds per pool-served ``start`` (the pool filled before each); raises if the pool
    does not fill or a start missed it."""
    provider.start_pool()
    samples = []
    for i in range(runs):
        _wait_for_full_pool(provider)
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


def _wait_for_full_pool(provider: SandboxProvider) -> None:
    """Until the pool holds all it aims at, so no refill competes with the timed start."""
    deadline = time.monotonic() + POOL_FILL_TIMEOUT_S
    while True:
        stats = provider.pool_stats()
        if stats.idle >= max(stats.target, 1):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm pool did not fill within {POOL_FILL_TIMEOUT_S:g} s")
        time.sleep(0.01)


def _check(stdout: str) -> None:
    if stdout != "1\n":
        raise RuntimeError(f"the sandbox answered {stdout!r} to {BENCH_CODE!r}")
