"""A Kiln service per test: its own data directory and database (SQLite, or PostgreSQL)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


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
