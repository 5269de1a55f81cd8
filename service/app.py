"""The FastAPI application."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import db, metrics
from service.api import candidates, deployments, errors, health, jobs, models, v2
from service.artifacts import get_store
from service.config import get_settings
from service.limits import BodyLimit
from service.requeue import RequeueLoop
from service.serving.manager import Manager, SyncLoop

logger = logging.getLogger("kiln.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    db.migrate()
    app.state.settings = get_settings()
    app.state.manager = Manager(get_store())
    sync = SyncLoop(app.state.manager)  # loads every deployment again after a restart
    sync.start()
    loop = RequeueLoop()
    loop.start()
    try:
        yield
    finally:
        loop.stop()
        sync.stop()
        app.state.manager.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="Kiln", version="0.1.0", lifespan=lifespan,
                  description="Convert PyTorch models into fast, validated inference services.")
    errors.install(app)
    for router in (health.router, models.router, jobs.router, candidates.router, deployments.router, v2.router):
        app.include_router(router)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    return app
