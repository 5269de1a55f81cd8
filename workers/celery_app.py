"""The Celery application of the workers: the client's configuration plus the task modules."""

from __future__ import annotations

from celery import Celery

from service.config import get_settings
from service.queue import celery_config


def create_celery() -> Celery:
    app = Celery("kiln", include=["workers.tasks"])
    app.conf.update(celery_config(get_settings()))
    return app


app = create_celery()
