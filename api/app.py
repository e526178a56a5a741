"""The FastAPI app factory: ``create_app(settings)``; run it with uvicorn.

Construction does no I/O: the Redis clients, the store and the enqueuer are built in
the lifespan and hung on ``app.state`` (settings, keys, redis, stream_redis, broker,
store, batches, enqueuer, intake, memory, metrics), which is what routes use. ``broker``
is the task queue's Redis (``ACTFLEET_BROKER_URL``), the same client as ``redis`` unless
it is set. ``stream_redis`` serves the event
streams' blocking reads, whose socket timeout must outlast a heartbeat interval; every
other command keeps the short one of ``redis``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agent.errors import ActfleetError
from api import routes_batches, routes_tasks, webhooks
from api.errors import install_handlers
from api.fleet import Enqueuer, fleet_health
from api.memory import MemoryGuard
from api.metrics import ApiMetrics, MetricsMiddleware, render
from api.openapi import install_openapi
from config.settings import Settings
from store.api_store import ApiStore, connect
from store.batches import BatchStore
from store.intake import Intake
from store.keys import Keys, Retention

DESCRIPTION = """Run CodeAct agents at scale. Authenticate with `Authorization: Bearer <key>`
(keys come from `actfleet keys create --tenant NAME`); each key sees only its tenant's
tasks and batches. Errors are `{"detail": {"message": ..., ...}}` and say what to fix."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise ActfleetError("ACTFLEET_REDIS_URL is not set: the API needs Redis")
        client = connect(settings.redis_url)
        streams = connect(settings.redis_url, block_s=settings.sse_heartbeat_s)
        broker_url = settings.broker_url
        separate = broker_url is not None and broker_url != settings.redis_url
        broker = connect(broker_url) if broker_url is not None and separate else client
        retention = Retention(settings.record_retention_s, settings.stream_retention_s)
        store = ApiStore(client, app.state.keys, retention)
        app.state.redis = client
        app.state.stream_redis = streams
        app.state.broker = broker
        app.state.store = store
        app.state.batches = BatchStore(store)
        app.state.enqueuer = Enqueuer(broker)
        app.state.intake = Intake(client, app.state.keys, broker=broker, retention=retention)
        app.state.memory = MemoryGuard(
            client, settings.redis_memory_high_fraction, settings.redis_full_retry_after_s
        )
        try:
            yield
        finally:
            await client.aclose()
            await streams.aclose()
            if broker is not client:
                await broker.aclose()

    app = FastAPI(
        title="actfleet",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.keys = Keys(settings.key_prefix)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_handlers(app)
    install_openapi(app, settings)
    app.add_exception_handler(RedisConnectionError, _store_unavailable)
    app.add_exception_handler(RedisTimeoutError, _store_unavailable)
    app.include_router(routes_tasks.router)
    app.include_router(routes_batches.router)
    app.include_router(webhooks.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={
            503: {"description": "Redis or the task queue is unreachable, or Redis is full"}
        },
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: Redis answers, the broker's task queue can be read, and Redis is below
        the memory fraction above which new work is refused (``memory``). The body also
        says how many workers sent a heartbeat lately and how many of those report a dead
        broker consumer (those do not make the API unready: their own health does)."""
        state = request.app.state
        try:
            fleet = await fleet_health(state.redis, state.keys, state.broker)
            memory = await state.memory.state()
        except Exception as e:  # any failure to reach Redis means "not ready"
            return JSONResponse({"status": "unavailable", "redis": repr(e)}, 503)
        if memory.high:
            return JSONResponse(
                {"status": "full", "redis": "ok", "memory": memory.public(), **fleet},
                503,
                headers={"Retry-After": str(state.memory.retry_after_s)},
            )
        return JSONResponse({"status": "ok", "redis": "ok", "memory": memory.public(), **fleet})

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics_page(request: Request) -> Response:
        """Prometheus metrics of this API, of local processes (multiprocess dir), and
        fleet-wide task counts read from Redis."""
        state = request.app.state
        return Response(
            await render(metrics, state.redis, state.keys, state.broker),
            media_type=CONTENT_TYPE_LATEST,
        )

    return app


async def _store_unavailable(request: Request, exc: Any) -> JSONResponse:
    return JSONResponse(
        {"detail": {"message": "the store (Redis) is unavailable; try again shortly"}},
        503,
        headers={"Retry-After": "5"},
    )
