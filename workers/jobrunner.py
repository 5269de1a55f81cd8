"""Runs one conversion job for a worker: claim it, lay out its bundle, run the engine with events
that write every step, candidate and log line to the database, and record how it ended.

A job interrupted by a dead worker resumes from its last finished step when it lands on the same
host again (the working directory keeps the engine's saved state)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import jobs, states
from service.artifacts import ArtifactStore, get_store
from service.config import get_settings
from service.db import retrying, session_scope
from service.errors import KilnError
from service.signature import Signature
from service.states import JobStatus
from service.tables import Job, now
from workers import engine
from workers.context import Context, StepRecord
from workers.pipeline import Canceled

logger = logging.getLogger("kiln.worker")
HEARTBEAT_S = 2.0
PROGRESS_EVERY_S = 0.5


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """Heartbeats a claimed job from a thread, and notices cancel requests and lost claims."""

    def __init__(self, job_id: str, token: str) -> None:
        self.job_id, self.token = job_id, token
        self.lost = False
        self.cancel = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def stop_requested(self) -> bool:
        return self.cancel or self.lost

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with session_scope() as s:
                    ours, cancel = jobs.heartbeat(s, self.job_id, self.token)
                self.lost = self.lost or not ours
                self.cancel = self.cancel or cancel
            except Exception:  # the database may blip; the next beat tries again
                logger.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


class DbEvents:
    """Pipeline events written to the job's rows. Candidate files go to the artifact store as
    soon as they are built, so the database never names an artifact the store does not hold."""

    def __init__(self, job_id: str, token: str, store: ArtifactStore) -> None:
        self.job_id, self.token, self.store = job_id, token, store
        self.files: dict[str, dict[str, str]] = {}
        self._lines: list[tuple[str, str]] = []
        self._last_flush = 0.0
        self._total = 0  # steps in the pipeline, from step_started (ctx.steps only has those begun so far)

    def _job(self, s: Session) -> Job | None:
        job = s.get(Job, self.job_id)
        return job if job is not None and job.run_token == self.token else None

    def _write(self, what: str, change: Callable[[Session, Job], None]) -> None:
        """Apply `change` to the job's rows with the log lines gathered so far, in one transaction,
        retried while the database is unreachable (a restart must not fail the job)."""
        pending = len(self._lines)

        def transaction() -> None:
            with session_scope() as s:
                if (job := self._job(s)) is not None:
                    change(s, job)
                    jobs.add_logs(s, self.job_id, self._lines[:pending])

        retrying(transaction, what=what)
        del self._lines[:pending]
        self._last_flush = time.monotonic()

    def step_started(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        self._total, self.ctx = total, ctx

        def change(s: Session, job: Job) -> None:
            job.current_step, job.progress = record.name, index / total
            jobs.upsert_step(s, self.job_id, index, record.model_dump())

        self._write(f"step {record.name}", change)

    def step_progress(self, ctx: Context, record: StepRecord, fraction: float, message: str) -> None:
        if time.monotonic() - self._last_flush < PROGRESS_EVERY_S:
            return
        progress = (ctx.steps.index(record) + fraction) / (self._total or len(ctx.steps) or 1)
        self._write("progress", lambda s, job: setattr(job, "progress", progress))

    def step_finished(self, ctx: Context, record: StepRecord, index: int, total: int) -> None:
        for c in ctx.candidates:  # built in this attempt or, after a resume, in an earlier one
            built = ctx.out / c.artifact_dir if c.artifact_dir else None
            if c.status == "built" and c.id not in self.files and built is not None and built.is_dir():
                self.files[c.id] = self.store.put_directory(built)

        def change(s: Session, job: Job) -> None:
            job.progress = (index + 1) / total
            jobs.upsert_step(s, self.job_id, index, record.model_dump())
            for pos, c in enumerate(ctx.candidates):
                jobs.upsert_candidate(s, self.job_id, pos, c.model_dump(mode="json"), self.files.get(c.id))

        self._write(f"step {record.name}", change)

    def interrupted(self) -> None:
        """Record the steps as they stand when the run stopped (the step that was running says why)."""
        ctx = getattr(self, "ctx", None)
        if ctx is None:
            return

        def change(s: Session, job: Job) -> None:
            for pos, record in enumerate(ctx.steps):
                jobs.upsert_step(s, self.job_id, pos, record.model_dump())

        self._write("steps", change)

    def log_line(self, ctx: Context, step: str, line: str) -> None:
        self._lines.append((step, line))
        if time.monotonic() - self._last_flush >= PROGRESS_EVERY_S:
            self._write("log", lambda s, job: None)


def run_job(job_id: str) -> str:
    """Claim and run a job; returns how it ended. Never raises for a job's own failure."""
    settings = get_settings()

    def take() -> tuple:
        with session_scope() as s:
            job = jobs.claim(s, job_id, worker_name(), stale_after=settings.job_stale_after_s)
            version = job.version
            bundle = {
                "filename": version.filename,
                "sha": version.bundle_sha256,
                "entry": version.entry,
                "weights": (version.weights_sha256, version.weights_filename) if version.weights_sha256 else None,
                "samples": version.samples_sha256,
                "signature": version.signature,
            }
            return job.run_token, job.attempts, job.cancel_requested, bundle, dict(job.options)

    try:
        token, attempt, cancel_requested, bundle, options = retrying(take, what=f"claiming job {job_id}")
        if cancel_requested:
            _finish(job_id, token, JobStatus.CANCELED, "canceled before it started")
            return JobStatus.CANCELED
    except jobs.ClaimRefused as exc:
        logger.info("not running job %s: %s", job_id, exc)
        return "skipped"
    logger.info("running job %s (attempt %d)", job_id, attempt)
    store = get_store()
    workdir = settings.data_dir.resolve() / "work" / job_id
    with Lease(job_id, token) as lease:
        try:
            ctx = _context(workdir, bundle, options, store)
            events = DbEvents(job_id, token, store)
            ctx = engine.run(ctx, events=events, canceled=lease.stop_requested)
        except Canceled:
            events.interrupted()
            if lease.lost:
                logger.warning("job %s was taken over by another worker; stopping", job_id)
                return "lost"
            _finish(job_id, token, JobStatus.CANCELED, "canceled while running")
            return JobStatus.CANCELED
        except KilnError as exc:
            _finish(job_id, token, JobStatus.FAILED, exc.detail)
            return JobStatus.FAILED
        except Exception as exc:  # a bug fails the job, it never crashes the worker
            logger.exception("job %s failed", job_id)
            _finish(job_id, token, JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return JobStatus.FAILED
    from workers.report import build_report

    report = build_report(ctx)
    status = JobStatus.SUCCEEDED if report["status"] == JobStatus.SUCCEEDED else JobStatus.FAILED
    _finish(
        job_id,
        token,
        status,
        report.get("error"),
        report=report,
        selected=ctx.selection.candidate if ctx.selection else None,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return status


def _context(workdir: Path, bundle: dict, options: dict, store: ArtifactStore) -> Context:
    """The saved context of an earlier attempt on this host, or a fresh one from the store."""
    out_dir = workdir / "out"
    if (saved := engine.resume(workdir / "engine")) is not None:
        return saved
    shutil.rmtree(workdir, ignore_errors=True)
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True)
    upload = inputs / bundle["filename"]
    shutil.copyfile(store.path(bundle["sha"]), upload)
    weights = samples = None
    if bundle["weights"]:
        weights = inputs / bundle["weights"][1]
        shutil.copyfile(store.path(bundle["weights"][0]), weights)
    if bundle["samples"]:
        samples = inputs / "samples.npz"
        shutil.copyfile(store.path(bundle["samples"]), samples)
    return engine.prepare(
        upload,
        out_dir,
        entry=bundle["entry"],
        weights=weights,
        samples=samples,
        signature=Signature.parse(bundle["signature"]),
        options=options,
        workdir=workdir / "engine",
        check_requirements=False,  # the load step checks them, so the job fails at that step
    )


def _finish(
    job_id: str, token: str, status: str, error: str | None, *, report: dict | None = None, selected: str | None = None
) -> None:
    retrying(lambda: _record_end(job_id, token, status, error, report, selected), what=f"finishing job {job_id}")


def _record_end(
    job_id: str, token: str, status: str, error: str | None, report: dict | None, selected: str | None
) -> None:
    from sqlalchemy import select

    from service.tables import CandidateRow

    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.run_token != token:
            return
        values: dict[str, Any] = {"error": error, "finished_at": now(), "current_step": None}
        if status == JobStatus.SUCCEEDED:
            values["progress"] = 1.0
        # compare-and-set on this run's token: a job taken over by another worker is not ours to end
        if not states.move_job(
            s, job_id, JobStatus(status), expect=[JobStatus.RUNNING], where=[Job.run_token == token], values=values
        ):
            return
        s.refresh(job)
        if report is not None:
            job.report = report
            for pos, c in enumerate(report.get("candidates", [])):
                jobs.upsert_candidate(s, job_id, pos, c)
            # steps as the report has them (the report step's own record included)
            for pos, st in enumerate(report.get("steps", [])):
                jobs.upsert_step(s, job_id, pos, st)
        if selected:
            row = s.scalar(select(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.name == selected))
            job.selected_candidate_id = row.id if row else None
        jobs.add_logs(s, job_id, [("job", f"job {status}" + (f": {error}" if error else ""))])
