"""Models and their versions: create from an upload, find, list, delete."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from service.artifacts import ArtifactStore
from service.bundles import ONNX, onnx_signature, prepare_bundle
from service.errors import Conflict, InvalidSignature, NotFound
from service.requirements import check as check_requirements
from service.signature import Signature
from service.tables import CandidateRow, Deployment, Job, Model, ModelVersion, new_id


def inspect_upload(
    store: ArtifactStore,
    *,
    filename: str,
    bundle_sha: str,
    entry: str | None,
    signature: str | None,
    weights: tuple[str, str] | None,
    samples_sha: str | None,
) -> dict:
    """Check an upload without running any of it: kind, entry point, manifest, signature.

    Unpacks into a throwaway directory (refusing unsafe archives) and returns what a version records.
    """
    tmp = Path(tempfile.mkdtemp(prefix="kiln-inspect-"))
    try:
        upload = tmp / "upload" / Path(filename).name
        upload.parent.mkdir()
        shutil.copyfile(store.path(bundle_sha), upload)
        weights_path = None
        if weights:
            weights_path = tmp / Path(weights[1]).name
            shutil.copyfile(store.path(weights[0]), weights_path)
        samples_path = store.path(samples_sha) if samples_sha else None
        bundle = prepare_bundle(
            upload, tmp / "bundle", entry=entry, weights=weights_path, samples=samples_path, signature=signature
        )
        check_requirements(bundle.requirements, where="this server")
        sig = bundle.signature or (onnx_signature(bundle) if bundle.kind == ONNX else None)
        if sig is None:
            raise InvalidSignature(
                "no signature: send one in the 'signature' field (JSON) or put it in the bundle's kiln.yaml"
            )
        if samples_path is not None:
            from service import samples as sample_io

            sample_io.check_against(sig, sample_io.load(samples_path), source="uploaded sample")
        return {"kind": bundle.kind, "entry": bundle.entry, "signature": sig.to_json()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_version(
    session: Session,
    *,
    owner: str,
    name: str,
    filename: str,
    bundle_sha: str,
    size: int,
    info: dict,
    weights: tuple[str, str] | None,
    samples_sha: str | None,
) -> tuple[ModelVersion, bool]:
    """A new version of the model `name` (created if new), or the newest version when it is identical."""
    combined = hashlib.sha256(
        "|".join(
            [
                bundle_sha,
                weights[0] if weights else "",
                samples_sha or "",
                info.get("entry") or "",
                Signature.parse(info["signature"]).model_dump_json(),
            ]
        ).encode()
    ).hexdigest()
    model = session.scalar(select(Model).where(Model.owner == owner, Model.name == name))
    if model is None:
        model = Model(id=new_id(), name=name, owner=owner)
        session.add(model)
        session.flush()
    else:
        latest = session.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version.desc()).limit(1)
        )
        if latest is not None and latest.sha256 == combined:
            return latest, False
    number = (session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)) or 0) + 1
    version = ModelVersion(
        id=new_id(),
        model_id=model.id,
        version=number,
        sha256=combined,
        bundle_sha256=bundle_sha,
        filename=Path(filename).name,
        kind=info["kind"],
        entry=info.get("entry"),
        signature=info["signature"],
        weights_sha256=weights[0] if weights else None,
        weights_filename=Path(weights[1]).name if weights else None,
        samples_sha256=samples_sha,
        size_bytes=size,
    )
    session.add(version)
    session.flush()
    return version, True


def get_model(session: Session, owner: str, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.owner == owner, Model.name == name))
    if model is None:
        raise NotFound(f"model {name!r} does not exist")
    return model


def get_version(session: Session, owner: str, name: str, version: int | None) -> ModelVersion:
    model = get_model(session, owner, name)
    if not model.versions:
        raise NotFound(f"model {name!r} has no versions")
    if version is None:
        return model.versions[-1]
    for v in model.versions:
        if v.version == version:
            return v
    raise NotFound(
        f"model {name!r} has no version {version} (it has {', '.join(str(v.version) for v in model.versions)})"
    )


def list_models(session: Session, owner: str, limit: int, offset: int) -> tuple[list[Model], int]:
    total = session.scalar(select(func.count()).select_from(Model).where(Model.owner == owner)) or 0
    models = session.scalars(select(Model).where(Model.owner == owner).order_by(Model.name).limit(limit).offset(offset))
    return list(models), total


def delete_version(session: Session, version: ModelVersion, in_use: bool) -> None:
    """Delete a version that no deployment uses and no job is converting."""
    if in_use:
        raise Conflict(f"version {version.version} of {version.model.name!r} is used by a deployment")
    busy = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.model_version_id == version.id, Job.status.in_(("queued", "running")))
    )
    if busy:
        raise Conflict(f"version {version.version} of {version.model.name!r} has {busy} job(s) queued or running")
    # Deleted deployments keep their rows; those that served this version's candidates go with them
    # (the candidates are deleted below, and nothing can serve them again).
    built = select(CandidateRow.id).join(Job, CandidateRow.job_id == Job.id).where(Job.model_version_id == version.id)
    session.execute(delete(Deployment).where(Deployment.candidate_id.in_(built), Deployment.deleted.is_(True)))
    for job in session.scalars(select(Job).where(Job.model_version_id == version.id)):
        session.delete(job)
    model = version.model
    session.delete(version)
    session.flush()
    if not model.versions:
        session.delete(model)


def blob_in_use(session: Session, sha256: str) -> bool:
    """Whether a model version refers to this stored file (as its bundle, weights or samples)."""
    query = (
        select(ModelVersion.id)
        .where(
            or_(
                ModelVersion.bundle_sha256 == sha256,
                ModelVersion.weights_sha256 == sha256,
                ModelVersion.samples_sha256 == sha256,
            )
        )
        .limit(1)
    )
    return session.scalar(query) is not None


def referenced_blobs(session: Session) -> set[str]:
    """Every stored file a row refers to: bundles, weights and samples of model versions, the files
    of built candidates."""
    found: set[str] = set()
    for row in session.execute(
        select(ModelVersion.bundle_sha256, ModelVersion.weights_sha256, ModelVersion.samples_sha256)
    ):
        found.update(v for v in row if v)
    for (files,) in session.execute(select(CandidateRow.files)):
        found.update(v for v in (files or {}).values() if isinstance(v, str))
    return found
