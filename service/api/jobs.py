"""/v1/jobs: create conversion jobs, follow them, cancel and retry them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import jobs, queue, registry
from service.api.deps import Owner, SessionDep
from service.db import session_scope
from service.errors import BadRequest, NotFound
from service.options import ConversionOptions
from service.schemas import MAX_OFFSET, JobCreate, JobOut, JobSummary, Page
from service.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger("kiln.api")


def send(job_id: str, queue_name: str) -> None:
    """Enqueue after commit. A broker that is down loses nothing: the job stays queued in the
    database and the requeue loop sends it again."""
    try:
        queue.enqueue(job_id, queue_name)
    except Exception as exc:  # noqa: BLE001 - kombu raises many types
        logger.warning("could not enqueue job %s now (%s); it will be sent again", job_id, exc)


@router.post("", status_code=202, response_model=JobOut, summary="Start a conversion job")
def create_job(
    body: JobCreate,
    session: SessionDep,
    owner: Owner,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    options = ConversionOptions.parse(body.model_dump(exclude={"model", "version"}, exclude_none=True))
    version = registry.get_version(session, owner, body.model, body.version)
    job, created = jobs.create(
        session,
        owner=owner,
        version=version,
        options=options,
        idempotency_key=idempotency_key,
        body_hash=jobs.request_hash(body.model_dump(mode="json")),
    )
    session.commit()
    if created:
        send(job.id, job.queue)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _out(session, job)


def _out(session: Session, job: Job) -> JobOut:
    out = JobOut.of(job)
    out.waiting = jobs.waiting_reason(session, job)
    return out


@router.get("", response_model=Page[JobSummary], summary="List jobs")
def list_jobs(
    session: SessionDep,
    owner: Owner,
    status: Annotated[str | None, Query(description="queued, running, succeeded, failed, canceled")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[JobSummary]:
    if status is not None and status not in jobs.STATUSES:
        raise BadRequest(f"unknown status {status!r}; use one of {', '.join(jobs.STATUSES)}")
    items, total = jobs.listing(session, owner, status=status, model=model, limit=limit, offset=offset)
    return Page(items=[JobSummary.of(j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="A job with its steps and candidates")
def get_job(job_id: str, session: SessionDep, owner: Owner) -> JobOut:
    return _out(session, jobs.get(session, owner, job_id))


@router.get("/{job_id}/report", summary="The full conversion report (JSON)")
def get_report(job_id: str, session: SessionDep, owner: Owner) -> dict:
    job = jobs.get(session, owner, job_id)
    if not job.report:
        raise NotFound(f"job {job_id} has no report yet (it is {job.status})")
    return job.report


@router.get("/{job_id}/logs", response_class=PlainTextResponse, summary="The job's log lines")
def get_logs(
    job_id: str, session: SessionDep, owner: Owner, after: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0
) -> str:
    jobs.get(session, owner, job_id)
    return "".join(f"[{line.step}] {line.line}\n" for line in jobs.logs(session, job_id, after))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, summary="Cancel a queued or running job")
def cancel_job(job_id: str, session: SessionDep, owner: Owner) -> JobOut:
    job = jobs.cancel(session, jobs.get(session, owner, job_id))
    return JobOut.of(job)


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut, summary="A new attempt of a failed job")
def retry_job(job_id: str, session: SessionDep, owner: Owner, response: Response) -> JobOut:
    new = jobs.retry(session, jobs.get(session, owner, job_id))
    session.commit()
    send(new.id, new.queue)
    response.headers["Location"] = f"/v1/jobs/{new.id}"
    return JobOut.of(new)


@router.get(
    "/{job_id}/events",
    summary="Progress as server-sent events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "events `job` (the job summary when it changes), `log` (new lines), "
            "`end` (the job finished)",
        }
    },
)
async def job_events(job_id: str, request: Request, owner: Owner, session: SessionDep) -> StreamingResponse:
    jobs.get(session, owner, job_id)  # 404 before the stream starts
    return StreamingResponse(
        _events(job_id, owner, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _snapshot(job_id: str, owner: str, after: int) -> tuple[dict, list[dict]]:
    with session_scope() as s:
        job = jobs.get(s, owner, job_id)
        summary = JobSummary.of(job).model_dump(mode="json")
        summary["steps"] = [
            {"name": st.name, "status": st.status, "duration_s": st.duration_s, "error": st.error} for st in job.steps
        ]
        lines = [{"seq": line.seq, "step": line.step, "line": line.line} for line in jobs.logs(s, job_id, after, 500)]
        return summary, lines


async def _events(job_id: str, owner: str, request: Request, poll: float = 0.5) -> AsyncIterator[bytes]:
    last, after, idle = None, 0, 0.0
    while True:
        if await request.is_disconnected():
            return
        summary, lines = await run_in_threadpool(_snapshot, job_id, owner, after)
        if lines:
            after = lines[-1]["seq"]
            yield f"event: log\ndata: {json.dumps(lines)}\n\n".encode()
        if summary != last:
            last = summary
            yield f"event: job\ndata: {json.dumps(summary)}\n\n".encode()
            idle = 0.0
        if summary["status"] in jobs.TERMINAL and not lines:
            yield f"event: end\ndata: {json.dumps({'status': summary['status']})}\n\n".encode()
            return
        idle += poll
        if idle >= 15:  # keep proxies from closing a quiet stream
            yield b": keep-alive\n\n"
            idle = 0.0
        await asyncio.sleep(poll)
