"""A Kiln service per test: its own data directory and database (SQLite, or PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ZOO, zoo_signature
from tests.service.procs import free_port

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
FAST = {"bench_seconds": 0.05, "threads": 1}


def clear_caches() -> None:
    from service import db, queue
    from service.config import get_settings

    get_settings.cache_clear()
    db.get_engine.cache_clear()
    db._factory.cache_clear()
    queue.client.cache_clear()


@pytest.fixture(params=["sqlite", "postgresql"])
def kiln_env(request, tmp_path, monkeypatch):
    """Settings for a fresh Kiln: data dir under tmp_path, SQLite or a new PostgreSQL database."""
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    dbname = None
    if request.param == "postgresql":
        dbname = f"kiln_test_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{dbname}"'))
        admin.dispose()
        monkeypatch.setenv("KILN_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}")
    else:
        monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KILN_BROKER_URL", raising=False)
    monkeypatch.setenv("KILN_AUTH", "off")  # tests/service/test_auth.py covers authentication
    clear_caches()
    yield request.param
    from service import db

    db.get_engine().dispose()
    clear_caches()
    if dbname:
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def api(kiln_env):
    """The real app in-process (its lifespan migrates the database); the broker is the file broker."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


class Server:
    """The real app under uvicorn in a thread, on a free loopback port."""

    def __init__(self) -> None:
        import uvicorn

        from service.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def convert(http: httpx.Client, name: str, zoo: str, **options) -> str:
    """Upload a zoo model and run its conversion job with the real job runner; returns the job id."""
    from workers.jobrunner import run_job

    sig = zoo_signature(zoo)
    r = http.post(
        "/v1/models",
        data={"name": name, "signature": json.dumps(sig)},
        files={"file": (f"{zoo}.py", (ZOO / f"{zoo}.py").read_bytes())},
    )
    assert r.status_code in (200, 201), r.text
    job = http.post("/v1/jobs", json={"model": name, "targets": ["onnxruntime"], **FAST, **options}).json()
    assert run_job(job["id"]) == "succeeded", http.get(f"/v1/jobs/{job['id']}").json()
    return job["id"]


@contextmanager
def serving(data: Path, *, auth: bool, **env: str) -> Iterator[Server]:
    """A real server for a module of serving tests: a fresh data dir, SQLite, the file broker,
    authentication on or off, any further KILN_* settings in `env`; settings restored after."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_DATA_DIR", str(data))
    mp.delenv("KILN_DATABASE_URL", raising=False)
    mp.delenv("KILN_BROKER_URL", raising=False)
    mp.setenv("KILN_AUTH", "on" if auth else "off")
    for key, value in env.items():
        mp.setenv(key, value)
    clear_caches()
    try:
        with Server() as srv:
            yield srv
    finally:
        mp.undo()
        clear_caches()
