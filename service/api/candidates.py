"""/v1/candidates: built artifacts with their validation and benchmark, and their files."""

from __future__ import annotations

import io
import zipfile
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from service.api.deps import Owner, SessionDep, StoreDep
from service.errors import NotFound
from service.schemas import CandidateOut
from service.tables import CandidateRow, Job

router = APIRouter(prefix="/v1/candidates", tags=["candidates"])


def get_candidate(session: Session, owner: str, candidate_id: str) -> CandidateRow:
    row = session.get(CandidateRow, candidate_id)
    job = session.get(Job, row.job_id) if row is not None else None
    if row is None or job is None or job.owner != owner:
        raise NotFound(f"candidate {candidate_id} does not exist")
    return row


@router.get("/{candidate_id}", response_model=CandidateOut, summary="One candidate")
def read(candidate_id: str, session: SessionDep, owner: Owner) -> CandidateOut:
    return CandidateOut.of(get_candidate(session, owner, candidate_id))


@router.get(
    "/{candidate_id}/artifact",
    summary="Download the built artifact",
    response_description="the model file, or with format=zip the whole artifact directory",
)
def artifact(
    candidate_id: str,
    session: SessionDep,
    owner: Owner,
    store: StoreDep,
    format: Annotated[str, Query(pattern="^(file|zip)$")] = "file",  # noqa: A002 - the query parameter's name in the API
):
    row = get_candidate(session, owner, candidate_id)
    if not row.files:
        raise NotFound(f"candidate {row.name} has no artifact ({row.status}: {row.reason or 'not built'})")
    if format == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, sha in row.files.items():
                zf.write(store.path(sha), f"{row.name}/{name}")
        buf.seek(0)
        return StreamingResponse(
            buf, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{row.name}.zip"'}
        )
    name = row.model_file or next(iter(row.files))
    return FileResponse(store.path(row.files[name]), filename=name, media_type="application/octet-stream")
