"""The Celery application of the workers: the client's configuration plus the task modules."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from service.config import get_settings
from service.queue import celery_config


def create_celery() -> Celery:
    app = Celery("kiln", include=["workers.tasks"])
    app.conf.update(celery_config(get_settings()))
    return app


app = create_celery()


@worker_process_init.connect
def _die_with_the_worker(**_: object) -> None:
    """A pool process dies with the worker's main process, whatever kills it (even SIGKILL): a pool
    process left behind would go on running a job's sandbox that nobody supervises. Its boxes die
    with it in turn (service/boundary.py)."""
    import ctypes
    import os
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the worker died before the line above
        os._exit(1)


@worker_process_init.connect
def _own_database_connections(**_: object) -> None:
    """A pool process is forked from the worker's main process, which holds open database
    connections (migrations, the presence heartbeat). Two processes on one PostgreSQL socket
    corrupt each other's sessions ('prepared statement "_pg3_0" already exists'), so the pool
    process forgets the inherited connections, without closing them under the parent, and opens
    its own."""
    from service import db

    for url in (None, get_settings().database_url):  # sessions use get_engine(); migrate() passes the URL
        db.get_engine(url).dispose(close=False)
