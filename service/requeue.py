"""Sends again what the database says must run but no worker is running: jobs whose worker died
(stale heartbeat) and queued jobs whose message was lost. Runs at start-up and periodically."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from sqlalchemy import select

from service import jobs, queue, registry, states
from service.artifacts import ArtifactStore
from service.config import get_settings
from service.db import session_scope
from service.states import JobStatus
from service.tables import Job, now

logger = logging.getLogger("kiln.requeue")


def requeue_orphans() -> list[str]:
    """One pass; returns the ids of the jobs sent again."""
    s = get_settings()
    sent: list[tuple[str, str]] = []
    with session_scope() as session:
        orphans = jobs.orphaned(session, stale_after=s.job_stale_after_s, queued_after=s.job_requeue_after_s)
        running = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
        orphans += [j for j in running if j not in orphans and dead_here(j.worker)]
        for job in orphans:
            if job.status == JobStatus.RUNNING:
                # compare-and-set on the run token: a worker that finished or took the job
                # meanwhile keeps it
                same_run = [Job.run_token == job.run_token]
                if job.attempts >= jobs.MAX_ATTEMPTS:
                    error = (
                        f"the worker running this job died {job.attempts} times "
                        f"(last during step {job.current_step or 'start'}); not trying again"
                    )
                    if states.move_job(
                        session,
                        job.id,
                        JobStatus.FAILED,
                        expect=[JobStatus.RUNNING],
                        where=same_run,
                        values={"finished_at": now(), "error": error},
                    ):
                        logger.warning("job %s: %s", job.id, error)
                    continue
                if not states.move_job(
                    session,
                    job.id,
                    JobStatus.QUEUED,
                    expect=[JobStatus.RUNNING],
                    where=same_run,
                    values={"run_token": None, "enqueued_at": now()},
                ):
                    continue
                logger.warning("job %s: worker %s stopped answering; sending the job again", job.id, job.worker)
            else:
                job.enqueued_at = now()
            sent.append((job.id, job.queue))
    for job_id, queue_name in sent:
        try:
            queue.enqueue(job_id, queue_name)
        except Exception as exc:  # noqa: BLE001 - the broker is down; the next pass tries again
            logger.warning("could not send job %s again: %s", job_id, exc)
    return [j for j, _ in sent]


def dead_here(worker: str | None) -> bool:
    """Whether a worker named host:pid ran on this host and its process is gone (no need to wait
    for its heartbeat to go stale, e.g. after `kiln up` restarted)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RequeueLoop:
    """A daemon thread that calls requeue_orphans every `interval` seconds."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = interval or max(get_settings().job_stale_after_s / 3, 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-requeue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_sweep = time.monotonic() + 60  # not while the service starts
        while not self._stop.is_set():
            try:
                requeue_orphans()
            except Exception:  # a database hiccup must not end the loop
                logger.exception("requeue pass failed")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + get_settings().store_sweep_interval_s
                try:
                    sweep_store()
                except Exception:  # nor a full disk or a missing store
                    logger.exception("artifact store sweep failed")
            self._stop.wait(self.interval)


def sweep_store() -> list[str]:
    """Remove files of the local artifact store that no row refers to, once they are older than the
    grace period (KILN_STORE_SWEEP_GRACE_S): what a refused upload or a crashed build left."""
    settings = get_settings()
    if settings.artifact_url:  # object storage: its own lifecycle rules do this
        return []
    with session_scope() as session:
        referenced = registry.referenced_blobs(session)
    removed = ArtifactStore(settings.artifact_dir).sweep(referenced, settings.store_sweep_grace_s)
    if removed:
        logger.info("artifact store sweep removed %d unreferenced file(s)", len(removed))
    return removed
