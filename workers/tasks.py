"""Celery tasks: thin, like a web view. They take a job id and hand it to the job runner."""

from __future__ import annotations

from service.queue import CONVERT_TASK
from workers.celery_app import app
from workers.jobrunner import run_job


@app.task(name=CONVERT_TASK)
def convert(job_id: str) -> str:
    """Run (or resume) the conversion job `job_id`; its state lives in the database."""
    return run_job(job_id)
