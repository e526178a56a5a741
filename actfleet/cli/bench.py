"""``actfleet bench``: the benchmarks that speed and memory targets are measured by.

``bench sandbox`` times a sandbox backend on its own (cold start to first result, warm
acquire for pooled backends, exec round trip); ``bench fleet`` pushes N tasks of T turns
through the real API, queue, workers and sandboxes against a fake model of fixed latency
(with ``--model-capacity K``, one that serves K requests at once, behind the model gate);
``bench scale`` submits large batches to the API alone (no workers): intake rate,
status-poll latency, Redis bytes per queued task (``actfleet.benchscale``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from config.settings import Settings


def _at_least(low: float, kind: Callable[[str], float] = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` that is at least ``low``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure a sandbox backend or the whole fleet")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)

    s = kinds.add_parser("sandbox", help="cold start, warm acquire and exec round trip")
    s.add_argument("--backend", choices=["bwrap", "docker"], help="default: ACTFLEET_SANDBOX")
    s.add_argument("--runs", type=_at_least(1), default=50, help="samples per figure (default 50)")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=bench_sandbox)

    f = kinds.add_parser("fleet", help="N tasks of T turns through API, queue and workers")
    f.add_argument("--tasks", type=_at_least(1), default=300, help="N tasks (default 300)")
    f.add_argument(
        "--turns", type=_at_least(1), default=3, help="T model turns per task (default 3)"
    )
    f.add_argument(
        "--latency", type=_at_least(0, float), default=2.0, help="L seconds per model reply"
    )
    f.add_argument("--concurrency", type=_at_least(1), default=100, help="C tasks in flight")
    f.add_argument(
        "--workers",
        type=_at_least(1),
        default=os.cpu_count() or 1,
        help="worker processes sharing the C loops (default: one per core)",
    )
    f.add_argument(
        "--no-warm-pool",
        dest="warm_pool",
        action="store_false",
        help="start every sandbox cold (default: a warm pool of C sandboxes)",
    )
    f.add_argument(
        "--model-capacity",
        type=_at_least(1),
        metavar="K",
        help="fake-llm serves at most K requests at once, 429 beyond; reports goodput",
    )
    f.add_argument(
        "--model-max-inflight",
        type=_at_least(1),
        metavar="M",
        help="run the workers behind the model gate with this cap "
        "(ACTFLEET_MODEL_MAX_INFLIGHT; default with --model-capacity: 2K, without: no gate)",
    )
    f.add_argument("--backend", choices=["bwrap", "docker"], help="default: ACTFLEET_SANDBOX")
    f.add_argument("--json", action="store_true", help="print one JSON document")
    f.set_defaults(func=bench_fleet)

    c = kinds.add_parser(
        "scale", help="intake rate, status-poll latency, Redis bytes per task (no workers)"
    )
    c.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="comma-separated batch sizes (default 1000,10000,100000)",
    )
    c.add_argument(
        "--polls", type=_at_least(1), default=20, help="status polls per size (default 20)"
    )
    c.add_argument(
        "--cluster",
        type=_at_least(3),
        default=0,
        metavar="M",
        help="records and streams on an M-master Redis Cluster on loopback, the queue on a "
        "Redis of its own (default: everything on one Redis)",
    )
    c.add_argument("--json", action="store_true", help="print one JSON document")
    c.set_defaults(func=bench_scale)


def _sizes(text: str) -> list[int]:
    """An argparse type: comma-separated batch sizes, each at least 1."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return sizes


def _settings(backend: str | None) -> Settings:
    settings = Settings()
    return settings.model_copy(update={"sandbox": backend}) if backend else settings


def bench_sandbox(args: argparse.Namespace) -> int:
    from workers.sandbox import make_provider
    from workers.sandbox.bench import bench_sandbox as measure

    settings = _settings(args.backend)
    if settings.sandbox == "docker":
        from workers.sandbox.docker_bench import bench_docker

        # Its own providers, in a fleet of this run alone (so no reaper takes them).
        report = bench_docker(args.runs, image=settings.sandbox_image)
    else:
        # One provider without a pool for cold starts, one with a pool of two for warm ones.
        cold = make_provider(settings.model_copy(update={"pool_max": 0}), worker_id="bench")
        pooled = settings.model_copy(update={"pool_min": 2, "pool_max": 2})
        warm = make_provider(pooled, worker_id="bench")
        try:
            report = measure(cold, runs=args.runs, warm=warm, cpu_s=_own_tree_cpu_s)
        finally:
            cold.close()
            warm.close()
    _print(report, args.json, "sandbox")
    return 0


def _own_tree_cpu_s() -> float:
    """CPU seconds of this process and all its descendants (a zygote's children too)."""
    from actfleet.proctime import tree_cpu

    return tree_cpu({"self": os.getpid()})["self"].total_s


def bench_fleet(args: argparse.Namespace) -> int:
    from actfleet.benchfleet import run_fleet_bench

    settings = _settings(args.backend)
    report = run_fleet_bench(
        settings,
        tasks=args.tasks,
        turns=args.turns,
        latency_s=args.latency,
        concurrency=args.concurrency,
        workers=args.workers,
        warm_pool=args.warm_pool,
        model_capacity=args.model_capacity,
        model_max_inflight=args.model_max_inflight,
        progress=None if args.json else Console(stderr=True),
    )
    _print(report, args.json, "fleet")
    return 0


def bench_scale(args: argparse.Namespace) -> int:
    from actfleet.benchscale import DEFAULT_SIZES, run_scale_bench

    console = None if args.json else Console(stderr=True)
    report = run_scale_bench(
        args.sizes or DEFAULT_SIZES,
        polls=args.polls,
        cluster=args.cluster,
        progress=console.print if console else None,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"actfleet bench scale ({report['redis']})", show_header=True)
    for name in (
        "tasks",
        "intake tasks/s",
        "poll p50 ms",
        "poll p95 ms",
        "bytes/task",
        "used/task",
        "redis µs/task",
        "busiest µs/task",
    ):
        table.add_column(name, justify="right")
    for fig in report["sizes"].values():
        table.add_row(
            str(fig["tasks"]),
            _fmt(fig["intake_tasks_per_s"]),
            _fmt(fig["status_poll_ms"]["p50"]),
            _fmt(fig["status_poll_ms"]["p95"]),
            _fmt(fig["bytes_per_task"]),
            _fmt(fig["used_memory_per_task"]),
            _fmt(fig["intake_redis_cpu"]["total_us_per_task"]),
            _fmt(fig["intake_redis_cpu"]["busiest_us_per_task"]),
        )
    Console().print(table)
    return 0


def _print(report: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"actfleet bench {title}", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if isinstance(value, dict):
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        else:
            shown = _fmt(value)
        table.add_row(key, shown)
    Console().print(table)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
