"""The state machines: every transition of every table is tried, the allowed ones land and the
others are refused; a job's moves are compare-and-set UPDATEs on a real database (SQLite and
PostgreSQL), so a race is lost, never overwritten."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from service import states
from service.states import (
    CANDIDATE_TRANSITIONS,
    DEPLOYMENT_TRANSITIONS,
    JOB_TRANSITIONS,
    STEP_TRANSITIONS,
    CandidateStatus,
    DeploymentState,
    IllegalTransition,
    JobStatus,
    StepStatus,
)


@pytest.mark.parametrize(
    ("table", "move", "make"),
    [
        (STEP_TRANSITIONS, states.move_step, lambda s: SimpleNamespace(name="load", status=s, error=None)),
        (CANDIDATE_TRANSITIONS, states.move_candidate, lambda s: SimpleNamespace(id="c", status=s, reason=None)),
        (
            DEPLOYMENT_TRANSITIONS,
            states.move_deployment,
            lambda s: SimpleNamespace(name="m", version=1, state=s, error=None),
        ),
    ],
    ids=["step", "candidate", "deployment"],
)
def test_every_transition_of_the_in_memory_machines(table, move, make):
    for src, dst in itertools.product(table, repeat=2):
        thing = make(src)
        same_is_a_no_op = move is not states.move_deployment and src == dst
        if dst in table[src] or same_is_a_no_op:
            move(thing, dst, "why")
            assert getattr(thing, "state", getattr(thing, "status", None)) == dst
        else:
            with pytest.raises(IllegalTransition, match=f"cannot go from {src} to {dst}"):
                move(thing, dst, "why")
            assert getattr(thing, "state", getattr(thing, "status", None)) == src  # unchanged


def test_the_tables_cover_every_state_and_terminal_jobs_go_nowhere():
    for enum, table in (
        (JobStatus, JOB_TRANSITIONS),
        (StepStatus, STEP_TRANSITIONS),
        (CandidateStatus, CANDIDATE_TRANSITIONS),
        (DeploymentState, DEPLOYMENT_TRANSITIONS),
    ):
        assert set(table) == set(enum)
    assert all(not JOB_TRANSITIONS[s] for s in states.TERMINAL)
    assert states.sources(JOB_TRANSITIONS, JobStatus.CANCELED) == [JobStatus.QUEUED, JobStatus.RUNNING]


def _job(session, status: JobStatus) -> str:
    from service.tables import Job, Model, ModelVersion, new_id

    model = Model(name=f"m-{status}-{new_id()}", owner="t")
    version = ModelVersion(
        model=model, version=1, sha256="0" * 64, bundle_sha256="0" * 64, filename="m.py", kind="python", signature={}
    )
    job = Job(owner="t", version=version, options={}, status=status, run_token="tok")
    session.add_all([model, version, job])
    session.commit()
    return job.id


def test_every_job_transition_on_the_database(kiln_env):
    from service import db
    from service.tables import Job

    db.migrate()
    with db.session_scope() as session:
        for src, dst in itertools.product(JobStatus, repeat=2):
            job_id = _job(session, src)
            if dst in JOB_TRANSITIONS[src]:
                assert states.move_job(session, job_id, dst, expect=[src]) is True
                session.commit()
                assert session.get(Job, job_id, populate_existing=True).status == dst
                # the same move again finds the job no longer where it expects it (unless it stays put)
                if src != dst:
                    assert states.move_job(session, job_id, dst, expect=[src]) is False
            else:
                with pytest.raises(IllegalTransition):
                    states.move_job(session, job_id, dst, expect=[src])
                # and by default it lands only from states the move allows
                assert states.move_job(session, job_id, dst) is False
                session.commit()
                assert session.get(Job, job_id, populate_existing=True).status == src


def test_a_job_move_is_a_compare_and_set(kiln_env):
    """A worker ending its run loses to a takeover: its token no longer matches, nothing changes."""
    from service import db
    from service.tables import Job

    db.migrate()
    with db.session_scope() as session:
        job_id = _job(session, JobStatus.RUNNING)
        assert not states.move_job(
            session, job_id, JobStatus.SUCCEEDED, where=[Job.run_token == "other"], values={"error": "x"}
        )
        assert states.move_job(
            session, job_id, JobStatus.SUCCEEDED, where=[Job.run_token == "tok"], values={"progress": 1.0}
        )
        session.commit()
        job = session.get(Job, job_id, populate_existing=True)
        assert (job.status, job.progress, job.error) == ("succeeded", 1.0, None)
        assert not states.move_job(session, job_id, JobStatus.CANCELED)  # terminal: nothing leaves it
