"""Jobs: creation with idempotency, listing, cancel and retry (the API's side), and claiming,
heartbeats and recording progress (the worker's side). The database is the truth about a job;
broker messages only say "look at job X"."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Update, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import states
from service.errors import Conflict, NotFound
from service.options import GPU_TARGETS, ConversionOptions
from service.states import JobStatus
from service.tables import CandidateRow, Job, JobLog, JobStep, Model, ModelVersion, WorkerRow, new_id, now

TERMINAL = tuple(states.TERMINAL)
STATUSES = tuple(states.JobStatus)
MAX_ATTEMPTS = 3


def queue_for(options: ConversionOptions) -> str:
    """GPU targets and jobs that ask for CUDA candidates go to the GPU queue, everything else to the CPU queue."""
    gpu = any(t in GPU_TARGETS for t in options.targets) or "cuda" in (options.devices or [])
    return "gpu" if gpu else "cpu"


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def create(
    session: Session,
    *,
    owner: str,
    version: ModelVersion,
    options: ConversionOptions,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
    retry_of: str | None = None,
) -> tuple[Job, bool]:
    """A new queued job, or the job an earlier request with the same Idempotency-Key created.

    Returns (job, created). The same key with a different body is a Conflict.
    """
    if idempotency_key:
        existing = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_hash != body_hash:
                raise Conflict(f"Idempotency-Key {idempotency_key!r} was already used with a different request body")
            return existing, False
    job = Job(
        id=new_id(),
        owner=owner,
        model_version_id=version.id,
        options=options.model_dump(mode="json"),
        queue=queue_for(options),
        idempotency_key=idempotency_key,
        request_hash=body_hash,
        retry_of=retry_of,
        enqueued_at=now(),
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        return create(
            session, owner=owner, version=version, options=options, idempotency_key=idempotency_key, body_hash=body_hash
        )
    return job, True


def get(session: Session, owner: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound(f"job {job_id} does not exist")
    return job


def listing(
    session: Session,
    owner: str,
    *,
    status: str | None = None,
    model: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Job], int]:
    q = select(Job).where(Job.owner == owner)
    if status:
        q = q.where(Job.status == status)
    if model:
        q = q.join(ModelVersion, Job.model_version_id == ModelVersion.id).join(Model).where(Model.name == model)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    jobs = session.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(jobs), total


def cancel(session: Session, job: Job) -> Job:
    """A queued job is canceled at once; a running one is asked to stop (its sandbox is killed).

    Conditional updates, so a worker claiming the job at the same moment is never overwritten:
    whichever lands first wins, and a claimed job then sees the cancel request."""
    if job.status in TERMINAL:
        raise Conflict(f"job {job.id} is already {job.status}")
    session.execute(
        update(Job).where(Job.id == job.id).values(cancel_requested=True).execution_options(synchronize_session=False)
    )
    states.move_job(
        session,
        job.id,
        JobStatus.CANCELED,
        expect=[JobStatus.QUEUED],
        values={"finished_at": now(), "error": "canceled before it started"},
    )
    session.commit()
    session.refresh(job)
    return job


def retry(session: Session, job: Job) -> Job:
    """A new attempt of a failed or canceled job, as a new job that points at the old one."""
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
        raise Conflict(f"only failed or canceled jobs can be retried; job {job.id} is {job.status}")
    new, _ = create(
        session, owner=job.owner, version=job.version, options=ConversionOptions(**job.options), retry_of=job.id
    )
    return new


# --- worker side ----------------------------------------------------------------------------------


class ClaimRefused(Exception):
    """The job is not ours to run now: finished, canceled, or running on a live worker."""


def _updated(session: Session, statement: Update) -> int:
    """Run an UPDATE; the number of rows it changed."""
    # an UPDATE's result is a CursorResult, which session.execute's annotation does not say
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def claim(session: Session, job_id: str, worker: str, *, stale_after: float) -> Job:
    """Take a job for this worker atomically. A job 'running' with a stale heartbeat (its worker
    died) can be taken over; one with a fresh heartbeat cannot, so a job never runs twice at once."""
    stale_before = now() - timedelta(seconds=stale_after)
    token = new_id()
    changed = states.move_job(
        session,
        job_id,
        JobStatus.RUNNING,
        where=[
            or_(
                Job.status == JobStatus.QUEUED,
                and_(
                    Job.status == JobStatus.RUNNING,
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
                ),
            )
        ],
        values={
            "worker": worker,
            "run_token": token,
            "heartbeat_at": now(),
            "attempts": Job.attempts + 1,
            "started_at": func.coalesce(Job.started_at, now()),
        },
    )
    session.commit()
    job = session.get(Job, job_id)
    if job is None:
        raise ClaimRefused(f"job {job_id} does not exist")
    session.refresh(job)
    if not changed or job.run_token != token:
        raise ClaimRefused(
            f"job {job_id} is {job.status}" + (f" on {job.worker}" if job.status == JobStatus.RUNNING else "")
        )
    return job


def heartbeat(session: Session, job_id: str, token: str) -> tuple[bool, bool]:
    """Refresh the heartbeat; returns (still ours, cancel requested)."""
    changed = _updated(
        session,
        update(Job)
        .where(Job.id == job_id, Job.run_token == token, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=now())
        .execution_options(synchronize_session=False),
    )
    session.commit()
    cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    return changed == 1, cancel


def orphaned(session: Session, *, stale_after: float, queued_after: float) -> list[Job]:
    """Jobs that need their message sent again: running with a dead worker, or queued so long that
    their message was probably lost (a broker restart, an API crash between commit and send)."""
    t = now()
    return list(
        session.scalars(
            select(Job).where(
                or_(
                    and_(Job.status == JobStatus.RUNNING, Job.heartbeat_at < t - timedelta(seconds=stale_after)),
                    and_(
                        Job.status == JobStatus.QUEUED,
                        Job.cancel_requested.is_(False),
                        or_(Job.enqueued_at.is_(None), Job.enqueued_at < t - timedelta(seconds=queued_after)),
                    ),
                )
            )
        ).all()
    )


def upsert_step(session: Session, job_id: str, position: int, record: dict[str, Any]) -> None:
    step = session.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.name == record["name"]))
    if step is None:
        step = JobStep(
            job_id=job_id, position=position, name=record["name"], status=states.StepStatus(record["status"])
        )
        session.add(step)
    started = record.get("started_at")
    step.status = states.StepStatus(record["status"])  # the worker's record, as its pipeline moved it
    step.started_at = datetime.fromtimestamp(started, UTC) if started else None
    step.duration_s = record.get("duration_s")
    step.log = record.get("log") or ""
    step.outputs = record.get("outputs") or {}
    step.error = record.get("error")


def upsert_candidate(
    session: Session, job_id: str, position: int, cand: dict[str, Any], files: dict[str, str] | None = None
) -> CandidateRow:
    row = session.scalar(select(CandidateRow).where(CandidateRow.job_id == job_id, CandidateRow.name == cand["id"]))
    if row is None:
        row = CandidateRow(
            job_id=job_id,
            position=position,
            name=cand["id"],
            target=cand["target"],
            precision=cand["precision"],
            variant=cand.get("variant"),
            status=states.CandidateStatus(cand["status"]),
        )
        session.add(row)
    validation = cand.get("validation")
    row.status = states.CandidateStatus(cand["status"])  # as the worker's compile step moved it
    row.passed = bool(cand["status"] == "built" and validation and validation.get("passed"))
    row.reason = cand.get("reason")
    row.model_file = cand.get("file")
    row.size_bytes = cand.get("size_bytes")
    row.validation = validation
    row.benchmark = cand.get("benchmark") or []
    row.speedup = cand.get("speedup")
    row.speedup_low = cand.get("speedup_low")
    row.speedup_high = cand.get("speedup_high")
    row.noisy = bool(cand.get("noisy"))
    row.lost_because = cand.get("lost_because")
    row.notes = cand.get("notes") or []
    if files is not None:
        row.files = files
    return row


def add_logs(session: Session, job_id: str, lines: list[tuple[str, str]]) -> None:
    if not lines:
        return
    job = session.get(Job, job_id)
    seq = job.log_seq if job else 0
    for step, line in lines:
        seq += 1
        session.add(JobLog(job_id=job_id, seq=seq, step=step, line=line[:4000]))
    if job:
        job.log_seq = seq


def logs(session: Session, job_id: str, after: int = 0, limit: int = 10_000) -> list[JobLog]:
    return list(
        session.scalars(
            select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after).order_by(JobLog.seq).limit(limit)
        ).all()
    )


WORKER_SEEN_S = 30.0


def waiting_reason(session: Session, job: Job) -> str | None:
    """Why a queued job is not running: no worker for its queue is online (a GPU job on a
    machine without GPU workers, say). None when one is, or the job is not queued."""
    if job.status != JobStatus.QUEUED:
        return None
    recent = session.scalars(
        select(WorkerRow).where(WorkerRow.last_seen > now() - timedelta(seconds=WORKER_SEEN_S))
    ).all()
    if any(job.queue in (w.queues or []) for w in recent):
        return None
    return (
        f"waiting for a worker on the {job.queue} queue: none is online "
        f"({'start one with: kiln worker --queues ' + job.queue}); the job can be canceled"
    )


def worker_seen(session: Session, name: str, host: str, queues: list[str]) -> None:
    row = session.get(WorkerRow, name)
    if row is None:
        session.add(WorkerRow(name=name, host=host, queues=queues))
    else:
        row.last_seen, row.queues = now(), queues


def worker_gone(session: Session, name: str) -> None:
    row = session.get(WorkerRow, name)
    if row is not None:
        session.delete(row)
