"""/v1/models: upload bundles, list and read models and versions, delete a version."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service import registry
from service.api.deps import Owner, SessionDep, SettingsDep, StoreDep
from service.errors import BadRequest
from service.schemas import MAX_OFFSET, ModelOut, ModelVersionOut, Page

router = APIRouter(prefix="/v1/models", tags=["models"])
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise BadRequest(
            f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@router.post(
    "",
    status_code=201,
    response_model=ModelVersionOut,
    summary="Upload a bundle as a new model, or a new version of one",
)
async def upload(
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    owner: Owner,
    response: Response,
    file: Annotated[UploadFile, File(description="The bundle: .py, .zip, .tar.gz, TorchScript .pt, .pt2 or .onnx")],
    name: Annotated[str, Form(description="Model name")],
    entry: Annotated[str | None, Form(description="Entry point, e.g. model.py:build_model")] = None,
    signature: Annotated[str | None, Form(description="Signature as JSON text")] = None,
    weights: Annotated[UploadFile | None, File(description=".safetensors or a state-dict .pt")] = None,
    samples: Annotated[UploadFile | None, File(description="Sample inputs, .npz")] = None,
) -> ModelVersionOut:
    check_name(name)
    if not file.filename:
        raise BadRequest("the 'file' field needs a file name (it tells the kind of bundle)")
    limit = settings.max_upload_bytes
    stored: list[str] = []  # what this upload added to the store: removed again if it is refused
    try:
        bundle_sha, size = await run_in_threadpool(store.put_stream, file.file, limit=limit, created=stored)
        weights_ref = None
        if weights is not None and weights.filename:
            w_sha, w_size = await run_in_threadpool(store.put_stream, weights.file, limit=limit, created=stored)
            weights_ref, size = (w_sha, weights.filename), size + w_size
        samples_sha = None
        if samples is not None and samples.filename:
            samples_sha, s_size = await run_in_threadpool(store.put_stream, samples.file, limit=limit, created=stored)
            size += s_size
        info = await run_in_threadpool(
            registry.inspect_upload,
            store,
            filename=file.filename,
            bundle_sha=bundle_sha,
            entry=entry,
            signature=signature,
            weights=weights_ref,
            samples_sha=samples_sha,
        )
        version, created = registry.add_version(
            session,
            owner=owner,
            name=name,
            filename=file.filename,
            bundle_sha=bundle_sha,
            size=size,
            info=info,
            weights=weights_ref,
            samples_sha=samples_sha,
        )
    except BaseException:
        session.rollback()
        for sha in stored:
            if not registry.blob_in_use(session, sha):
                store.discard(sha)
        raise
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/models/{name}/versions/{version.version}"
    return ModelVersionOut.of(version, existing=not created)


@router.get("", response_model=Page[ModelOut], summary="List models")
def list_models(
    session: SessionDep,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[ModelOut]:
    models, total = registry.list_models(session, owner, limit, offset)
    return Page(items=[ModelOut.of(m) for m in models], total=total, limit=limit, offset=offset)


@router.get("/{name}", response_model=ModelOut, summary="A model with its versions")
def get_model(name: str, session: SessionDep, owner: Owner) -> ModelOut:
    return ModelOut.of(registry.get_model(session, owner, name))


@router.get("/{name}/versions/{version}", response_model=ModelVersionOut, summary="One version of a model")
def get_version(name: str, version: int, session: SessionDep, owner: Owner) -> ModelVersionOut:
    return ModelVersionOut.of(registry.get_version(session, owner, name, version))


@router.delete("/{name}/versions/{version}", status_code=204, summary="Delete a version no deployment uses")
def delete_version(name: str, version: int, session: SessionDep, owner: Owner) -> Response:
    from service.deployments import uses_version

    v = registry.get_version(session, owner, name, version)
    registry.delete_version(session, v, in_use=uses_version(session, v.id))
    return Response(status_code=204)
