"""``actfleet worker``, ``actfleet api`` and ``actfleet up`` (the whole stack on one machine).

``up`` runs ``actfleet.stack.LocalStack``: a private ``redis-server`` (AOF ``everysec``, a
free port, data under ``--state-dir``) unless ``ACTFLEET_REDIS_URL`` is set, the API and
one worker, sharing ``PROMETHEUS_MULTIPROC_DIR`` so the API's ``/metrics`` shows the
workers' counters too. Ctrl-C (or SIGTERM) stops them all, workers first.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from actfleet.cli import CLIError
from config.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    w = sub.add_parser("worker", help="run a worker: agent loops from the queue, with sandboxes")
    w.add_argument(
        "--concurrency",
        type=int,
        help="agent loops in this process (default ACTFLEET_WORKER_CONCURRENCY)",
    )
    w.add_argument("--metrics-port", type=int, help="serve /metrics on this port")
    w.set_defaults(func=worker)

    a = sub.add_parser("api", help="run the HTTP API (uvicorn)")
    a.add_argument("--host", default="127.0.0.1", help="address (default %(default)s)")
    a.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    a.set_defaults(func=api)

    u = sub.add_parser("up", help="run the whole stack here: redis, the API, a worker")
    u.add_argument("--host", default="127.0.0.1", help="API address (default %(default)s)")
    u.add_argument("--port", type=int, default=8000, help="API port (default %(default)s)")
    u.add_argument("--concurrency", type=int, help="agent loops in the worker")
    u.add_argument(
        "--state-dir",
        default=os.path.expanduser("~/.local/state/actfleet"),
        help="redis data and metrics files (default %(default)s)",
    )
    u.set_defaults(func=up)


def _settings_and_logging() -> Settings:
    from config.logging import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def worker(args: argparse.Namespace) -> int:
    settings = _settings_and_logging()
    if not settings.redis_url:
        raise CLIError("set ACTFLEET_REDIS_URL (or use `actfleet up`)")
    update: dict[str, object] = {}
    if args.concurrency:
        update["worker_concurrency"] = args.concurrency
    if args.metrics_port is not None:
        update["worker_metrics_port"] = args.metrics_port
    settings = settings.model_copy(update=update)
    from workers.worker import run_worker

    return run_worker(settings, loglevel=settings.log_level)


def api(args: argparse.Namespace) -> int:
    settings = _settings_and_logging()
    if not settings.redis_url:
        raise CLIError("set ACTFLEET_REDIS_URL (or use `actfleet up`)")
    import uvicorn

    from api.app import create_app
    from config.heap import freeze_startup_heap

    app = create_app(settings)
    freeze_startup_heap()
    uvicorn.run(app, host=args.host, port=args.port, log_config=None)
    return 0


def up(args: argparse.Namespace) -> int:
    from actfleet.stack import LocalStack, StackError

    settings = Settings()
    stack = LocalStack(
        redis_url=settings.redis_url,
        api_host=args.host,
        api_port=args.port,
        concurrency=args.concurrency or settings.worker_concurrency,
        state_dir=Path(args.state_dir),
        log_to_console=True,
    )

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start()
        api_url = stack.api_url
        print(
            f"actfleet up: API {api_url}/v1  docs {api_url}/docs  metrics {api_url}/metrics",
            file=sys.stderr,
        )
        print(
            f"actfleet up: redis {stack.redis_url}  state {args.state_dir}  (Ctrl-C stops)",
            file=sys.stderr,
        )
        model_server = os.environ.get("OPENAI_BASE_URL") or "the openai SDK's default"
        print(
            f"actfleet up: model {settings.model} at {model_server} (OPENAI_BASE_URL); "
            f"sandboxes: {settings.sandbox}",
            file=sys.stderr,
        )
        while True:
            stack.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except StackError as e:
        raise CLIError(str(e)) from e
    finally:
        stack.stop()
