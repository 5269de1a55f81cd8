"""The Celery *client*: configuration shared with the workers, and enqueueing by task name.

No task code lives here; the API sends "kiln.convert" with a job id and never imports workers.
Without KILN_BROKER_URL the broker is a folder of message files under the data directory, so one
machine needs no Redis; the database, not the broker, is the truth about every job.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from service.config import Settings, get_settings

CONVERT_TASK = "kiln.convert"
QUEUES = ("cpu", "gpu")


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    conf: dict[str, Any] = {
        "broker_url": url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        # A message is acknowledged only after the job ran, and put back when the process running
        # it dies, so a killed worker's job is picked up again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.job_time_limit_s,
        "task_soft_time_limit": max(settings.job_time_limit_s - 60, 1),
        "task_default_queue": "cpu",
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if url.startswith("filesystem://"):
        # The file transport has no host; naming one spares a kombu warning at every connection.
        conf["broker_url"] = "filesystem://localhost/" if url.rstrip("/") == "filesystem:" else url
        folder = settings.data_dir.resolve() / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
        conf["worker_enable_remote_control"] = False  # no broadcast exchange over files
    else:
        # Longer than the hard limit: Redis must not hand a running job to a second worker.
        conf["broker_transport_options"] = {"visibility_timeout": settings.job_time_limit_s + 600}
    return conf


@lru_cache
def client() -> Celery:
    app = Celery("kiln-client")
    app.conf.update(celery_config(get_settings()))
    return app


def enqueue(job_id: str, queue: str) -> None:
    """Ask a worker on `queue` to run the job. Duplicates are harmless: workers claim jobs atomically."""
    client().send_task(CONVERT_TASK, args=[job_id], queue=queue)


def broker_ping(timeout: float = 2.0) -> None:
    """Raise if the broker cannot be reached."""
    with client().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
