"""The FastAPI application."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__, auth, dashboard, db, metrics
from service.api import candidates, deployments, errors, health, jobs, models, tokens, v2
from service.api.deps import principal
from service.artifacts import get_store
from service.config import get_settings
from service.limits import RequestGate
from service.requeue import RequeueLoop
from service.serving.manager import Manager, SyncLoop

logger = logging.getLogger("kiln.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    db.migrate()
    app.state.settings = settings = get_settings()
    if settings.auth:
        with db.session_scope() as session:
            token = auth.bootstrap(session, settings.data_dir)
        if token:
            logger.warning(
                "created the admin token and saved it in %s (readable only by its owner); "
                "the kiln CLI on this machine reads it from there",
                settings.data_dir.resolve() / auth.ADMIN_TOKEN_FILE,
            )
    app.state.manager = Manager(get_store())
    app.state.sync = sync = SyncLoop(app.state.manager)  # loads every deployment again after a restart
    sync.start()
    loop = RequeueLoop()
    loop.start()
    grpc_server = None
    if settings.grpc_port:
        from service.serving import grpc_server as kserve_grpc

        grpc_server = await kserve_grpc.start(app.state.manager, settings.grpc_host, settings.grpc_port)
    gc.freeze()  # everything made at start lives as long as the process: see Manager.load
    try:
        yield
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        loop.stop()
        sync.stop()
        app.state.manager.close()


class KilnApp(FastAPI):
    """The app, with inference requests (POST /v2/models/{name}[/versions/{version}]/infer) taken
    ahead of the framework's own layers (its error and telemetry middleware, its router): they go
    through the same request gate (and CORS) as every route, straight to the /v2 handler. Every
    other request, and the lifespan, take the usual way."""

    infer_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.infer_stack is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and v2.INFER_PATH.match(scope["path"]) is not None
        ):
            scope["app"] = self
            await self.infer_stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app() -> FastAPI:
    settings = get_settings()
    app = KilnApp(
        title="Kiln",
        version=__version__,
        lifespan=lifespan,
        description="Convert PyTorch models into fast, validated inference services.",
    )
    errors.install(app)
    for router in (
        health.router,
        models.router,
        jobs.router,
        candidates.router,
        deployments.router,
        tokens.router,
        v2.router,
    ):
        app.include_router(router)
    app.include_router(dashboard.router)  # the HTML dashboard at / with its static files (service/dashboard)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (an admin or metrics token: every team's series)")
    def prometheus(request: Request) -> Response:
        principal(request, "metrics")
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # the same gate (and CORS) around the inference handler, for KilnApp's short way in
    inner: ASGIApp = v2.infer_asgi
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        cors: dict[str, Any] = {
            "allow_origins": settings.cors_origins,
            "allow_credentials": False,
            "allow_methods": ["*"],
            "allow_headers": ["Authorization", "Content-Type", "Inference-Header-Content-Length"],
        }
        app.add_middleware(CORSMiddleware, **cors)
        inner = CORSMiddleware(inner, **cors)
    app.add_middleware(RequestGate, settings=settings)
    app.infer_stack = RequestGate(inner, settings=settings)
    return app
