"""The FastAPI application."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from service import db
from service.api import candidates, errors, health, jobs, models
from service.config import get_settings
from service.limits import BodyLimit
from service.requeue import RequeueLoop

logger = logging.getLogger("kiln.api")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    db.migrate()
    loop = RequeueLoop()
    loop.start()
    try:
        yield
    finally:
        loop.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="Kiln", version="0.1.0", lifespan=lifespan,
                  description="Convert PyTorch models into fast, validated inference services.")
    errors.install(app)
    for router in (health.router, models.router, jobs.router, candidates.router):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    return app
