"""Deployments in the database: create a version from a candidate or a job, default version,
rollback, delete. What is loaded in memory follows these rows (service/serving/manager.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.errors import Conflict, InvalidOptions, NotFound
from service.tables import CandidateRow, Deployment, Job, new_id

OPTION_KEYS = ("max_batch_size", "max_queue_delay_ms", "max_queue_size", "instances", "threads")


def candidate_for(session: Session, owner: str, candidate: str | None, job: str | None) -> CandidateRow:
    if bool(candidate) == bool(job):
        raise InvalidOptions("give either 'candidate' (an id) or 'job' (its selected candidate), not both")
    if job:
        j = session.get(Job, job)
        if j is None or j.owner != owner:
            raise NotFound(f"job {job} does not exist")
        if not j.selected_candidate_id:
            raise Conflict(f"job {job} has no selected candidate (it is {j.status})")
        candidate = j.selected_candidate_id
    row = session.get(CandidateRow, candidate)
    job_row = session.get(Job, row.job_id) if row is not None else None
    if row is None or job_row is None or job_row.owner != owner:
        raise NotFound(f"candidate {candidate} does not exist")
    return row


def create(
    session: Session, *, owner: str, name: str, candidate: CandidateRow, options: dict[str, Any], force: bool
) -> Deployment:
    """The next version of deployment `name` (not yet the default: it becomes so once it loaded)."""
    if not candidate.files:
        raise Conflict(f"candidate {candidate.name} has no artifact to serve ({candidate.status})")
    if not candidate.passed and not force:
        reason = (candidate.validation or {}).get("reason") or candidate.reason or "not validated"
        raise Conflict(f"candidate {candidate.name} failed validation ({reason}); set force to deploy it anyway")
    number = (
        session.scalar(select(func.max(Deployment.version)).where(Deployment.owner == owner, Deployment.name == name))
        or 0
    ) + 1
    row = Deployment(
        id=new_id(),
        owner=owner,
        name=name,
        version=number,
        candidate_id=candidate.id,
        options={k: v for k, v in options.items() if k in OPTION_KEYS and v is not None},
        forced=force and not candidate.passed,
    )
    session.add(row)
    session.flush()
    return row


def versions(session: Session, owner: str, name: str) -> list[Deployment]:
    rows = session.scalars(
        select(Deployment)
        .where(Deployment.owner == owner, Deployment.name == name, Deployment.deleted.is_(False))
        .order_by(Deployment.version)
    ).all()
    if not rows:
        raise NotFound(f"deployment {name!r} does not exist")
    return list(rows)


def set_default(session: Session, owner: str, name: str, version: int) -> Deployment:
    rows = versions(session, owner, name)
    target = next((r for r in rows if r.version == version), None)
    if target is None:
        raise NotFound(f"deployment {name!r} has no version {version}")
    session.execute(
        update(Deployment)
        .where(Deployment.owner == owner, Deployment.name == name)
        .values(is_default=False)
        .execution_options(synchronize_session="fetch")
    )
    target.is_default = True
    session.flush()
    return target


def previous_version(session: Session, owner: str, name: str) -> int:
    rows = versions(session, owner, name)
    current = next((r.version for r in rows if r.is_default), None)
    older = [r.version for r in rows if current is None or r.version < current]
    if not older:
        raise Conflict(f"deployment {name!r} has no version before {current} to roll back to")
    return max(older)


def delete(session: Session, owner: str, name: str) -> None:
    for r in versions(session, owner, name):
        r.deleted, r.is_default = True, False


def listing(session: Session, owner: str) -> dict[str, list[Deployment]]:
    rows = session.scalars(
        select(Deployment)
        .where(Deployment.owner == owner, Deployment.deleted.is_(False))
        .order_by(Deployment.name, Deployment.version)
    ).all()
    grouped: dict[str, list[Deployment]] = {}
    for r in rows:
        grouped.setdefault(r.name, []).append(r)
    return grouped


def uses_version(session: Session, model_version_id: str) -> bool:
    """Whether any live deployment serves a candidate built from this model version."""
    return bool(
        session.scalar(
            select(func.count())
            .select_from(Deployment)
            .join(CandidateRow, Deployment.candidate_id == CandidateRow.id)
            .join(Job, CandidateRow.job_id == Job.id)
            .where(Job.model_version_id == model_version_id, Deployment.deleted.is_(False))
        )
    )
