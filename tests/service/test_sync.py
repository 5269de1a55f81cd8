"""The deployment sync loop reads the deployments' full rows (each version's job report with them)
only when a row changed: on a replica serving traffic, a full read every few seconds held up the
requests in flight (tens of milliseconds of Python, and a tail to match)."""

from __future__ import annotations

import pytest


@pytest.fixture
def manager(tmp_path, monkeypatch):
    from service import db
    from service.artifacts import get_store
    from service.serving import manager as manager_module
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("KILN_DATABASE_URL", raising=False)
    clear_caches()
    db.migrate()
    reads: list[int] = []
    monkeypatch.setattr(manager_module, "desired_rows", lambda: reads.append(1) or [])
    yield manager_module.Manager(get_store()), reads
    db.get_engine().dispose()
    clear_caches()


def _row(session):
    """A deployment version with the rows it stands on (a model, its version, a job, a candidate)."""
    from service.tables import CandidateRow, Deployment, Job, Model, ModelVersion

    model = Model(name="m", owner="default")
    version = ModelVersion(
        model=model, version=1, sha256="0" * 64, bundle_sha256="0" * 64, filename="m.py", kind="python", signature={}
    )
    job = Job(owner="default", version=version, options={}, status="succeeded", run_token="tok")
    session.add_all([model, version, job])
    session.flush()
    cand = CandidateRow(
        job_id=job.id, position=0, name="onnxruntime-fp32", target="onnxruntime", precision="fp32", status="passed"
    )
    session.add(cand)
    session.flush()
    session.add(Deployment(owner="default", name="m", version=1, candidate_id=cand.id))


def test_a_sync_with_nothing_changed_reads_no_rows(manager):
    from service.db import session_scope
    from service.tables import Deployment

    m, reads = manager
    m.sync()
    assert m.synced and len(reads) == 2  # the first pass reads (and reads the defaults again)
    m.sync()
    m.sync()
    assert len(reads) == 2  # nothing changed: no full read

    with session_scope() as s:  # a version added
        _row(s)
    m.sync()
    assert len(reads) == 4
    m.sync()
    assert len(reads) == 4

    with session_scope() as s:  # made the default: its updated_at moves
        row = s.query(Deployment).one()
        row.is_default = True
    m.sync()
    assert len(reads) == 6

    with session_scope() as s:  # deleted (the row stays, flagged)
        s.query(Deployment).one().deleted = True
    m.sync()
    assert len(reads) == 8
