"""The state machines of Kiln, in one place: the states of a job, a pipeline step, a candidate and
a served deployment version, the transitions each allows (as data), and the functions that move a
thing from one state to another. Nothing else writes a status.

A job's status lives in the database, and several processes race for it (the API cancels, workers
claim, the requeue loop takes back jobs whose worker died): `move_job` is one compare-and-set UPDATE
that lands only from the states the transition allows (and whatever else the caller requires, such
as its run token), and says whether it landed.

    job:        queued -> running -> succeeded | failed | canceled
                queued -> canceled              (canceled before it started)
                running -> queued               (its worker died; sent again)
                running -> running              (a stale job taken over by another worker)
    step:       pending -> running -> ok | failed | skipped; pending -> skipped | failed;
                any -> pending                  (a resumed conversion runs a step again)
    candidate:  pending -> built | failed | unavailable; any -> pending (rebuilt)
    deployment: loading -> ready | failed; ready -> loading (reloaded)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from service.errors import Conflict


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class CandidateStatus(StrEnum):
    PENDING = "pending"
    BUILT = "built"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


class DeploymentState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

JOB_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}
STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset({StepStatus.RUNNING, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.PENDING}),
    StepStatus.RUNNING: frozenset({StepStatus.OK, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.PENDING}),
    StepStatus.OK: frozenset({StepStatus.PENDING}),
    StepStatus.FAILED: frozenset({StepStatus.PENDING}),
    StepStatus.SKIPPED: frozenset({StepStatus.PENDING}),
}
CANDIDATE_TRANSITIONS: Mapping[CandidateStatus, frozenset[CandidateStatus]] = {
    CandidateStatus.PENDING: frozenset(
        {CandidateStatus.BUILT, CandidateStatus.FAILED, CandidateStatus.UNAVAILABLE, CandidateStatus.PENDING}
    ),
    CandidateStatus.BUILT: frozenset({CandidateStatus.PENDING}),
    CandidateStatus.FAILED: frozenset({CandidateStatus.PENDING}),
    CandidateStatus.UNAVAILABLE: frozenset({CandidateStatus.PENDING}),
}
DEPLOYMENT_TRANSITIONS: Mapping[DeploymentState, frozenset[DeploymentState]] = {
    DeploymentState.LOADING: frozenset({DeploymentState.READY, DeploymentState.FAILED}),
    DeploymentState.READY: frozenset({DeploymentState.LOADING, DeploymentState.FAILED}),
    DeploymentState.FAILED: frozenset({DeploymentState.LOADING}),
}


class IllegalTransition(Conflict):
    """A move the state machine does not allow (a bug, or a race the caller must handle)."""


S = TypeVar("S", bound=StrEnum)


def allowed(table: Mapping[S, frozenset[S]], src: S, dst: S) -> bool:
    return dst in table[src]


def sources(table: Mapping[S, frozenset[S]], dst: S) -> list[S]:
    """Every state `dst` may be reached from."""
    return [s for s, targets in table.items() if dst in targets]


def check(table: Mapping[S, frozenset[S]], src: S, dst: S, what: str) -> S:
    """`dst`, or IllegalTransition when `table` does not allow src -> dst."""
    if not allowed(table, src, dst):
        raise IllegalTransition(f"{what} cannot go from {src} to {dst}")
    return dst


def move_job(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    expect: Iterable[JobStatus] | None = None,
    where: Iterable[Any] = (),
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Move a job to `to` with one compare-and-set UPDATE: it lands only while the job is in one of
    `expect` (default: every state `to` may be reached from; each must allow the move) and `where`
    holds. Other columns of `values` change with it. Returns whether it landed. The caller commits."""
    from service.tables import Job

    froms = list(expect) if expect is not None else sources(JOB_TRANSITIONS, to)
    for src in froms:
        check(JOB_TRANSITIONS, src, to, "a job")
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in froms]), *where)
        .values(status=to.value, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    # an UPDATE's result is a CursorResult, which session.execute's annotation does not say
    result: CursorResult[Any] = session.execute(statement)  # type: ignore[assignment]
    return result.rowcount == 1


def move_step(record: Any, to: StepStatus, error: str | None = None) -> None:
    """A pipeline step's record moves to `to` (its error with it); a move to the state it is in
    changes nothing else (a resumed step that was running, the report step marking itself done)."""
    src = StepStatus(record.status)
    record.status = to if src == to else check(STEP_TRANSITIONS, src, to, f"step {record.name}")
    record.error = error


def move_candidate(candidate: Any, to: CandidateStatus, reason: str | None = None) -> None:
    """A candidate moves to `to` (with why, when it was not built)."""
    src = CandidateStatus(candidate.status)
    candidate.status = to if src == to else check(CANDIDATE_TRANSITIONS, src, to, f"candidate {candidate.id}")
    candidate.reason = reason


def move_deployment(served: Any, to: DeploymentState, error: str | None = None) -> None:
    """A served deployment version moves to `to` (with the error that failed it)."""
    served.state = check(
        DEPLOYMENT_TRANSITIONS, DeploymentState(served.state), to, f"deployment {served.name} v{served.version}"
    )
    served.error = error
