"""The database: one engine per URL, sessions, and migrations with Alembic.

SQLite by default (a file in the data directory), PostgreSQL when KILN_DATABASE_URL says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from service.config import get_settings

MIGRATIONS = Path(__file__).parent / "migrations"
logger = logging.getLogger("kiln.db")
T = TypeVar("T")


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cur = conn.cursor()
            # WAL lets the API read while a worker writes; the busy timeout rides out short locks.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    return engine


@lru_cache
def _factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def new_session() -> Session:
    return _factory()()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(url: str | None = None) -> None:
    """Bring the schema to the newest revision (creates the database on first use)."""
    from alembic import command
    from alembic.config import Config

    url = url or get_settings().database_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with get_engine(url).begin() as conn:
        if conn.dialect.name == "postgresql":
            # API replicas and workers starting together must not migrate at the same time
            conn.execute(text("SELECT pg_advisory_xact_lock(724165001)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def ping() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


def retrying(fn: Callable[[], T], *, what: str, timeout: float = 120.0) -> T:
    """Run a unit of database work, again and again while the database cannot be reached (a
    restart, a failover), for up to `timeout` seconds. Only connection failures are retried."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    deadline, delay = time.monotonic() + timeout, 0.2
    while True:
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if not (isinstance(exc, OperationalError) or exc.connection_invalidated) or time.monotonic() > deadline:
                raise
            logger.warning("database unavailable during %s (%s); retrying", what, str(exc).splitlines()[0][:200])
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
