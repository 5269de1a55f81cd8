"""/v1/deployments: serve a candidate under a name; versions, default, rollback, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import deployments, notify
from service.api.deps import Owner, SessionDep
from service.api.models import check_name
from service.errors import Conflict, InvalidOptions
from service.schemas import DeploymentCreate, DeploymentOut, DeploymentPatch, VersionOut
from service.serving.manager import Manager, kept, row_dict
from service.tables import Deployment

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])


def _manager(request: Request) -> Manager:
    return request.app.state.manager


def _changed(request: Request) -> None:
    """Tell the other replicas, and re-read here too (which also drops versions no longer kept)."""
    notify.publish()
    request.app.state.sync.wake()


def _out(request: Request, owner: str, name: str, rows: list[Deployment]) -> DeploymentOut:
    mgr = _manager(request)
    held = {
        r["version"]
        for r in kept([{"owner": owner, "name": name, "version": r.version, "is_default": r.is_default} for r in rows])
    }
    items = []
    for r in rows:
        served = mgr.served.get((owner, name), {}).get(r.version)
        state = served.state if served else ("loading" if r.version in held else "standby")
        items.append(
            VersionOut(
                version=r.version,
                candidate=r.candidate_id,
                candidate_name=r.candidate.name,
                runtime=r.candidate.target,
                options=r.options or {},
                default=r.is_default,
                forced=r.forced,
                state=state,
                error=served.error if served else None,
                batching=served.batching if served else None,
                batching_note=served.batching_note if served else None,
                max_batch_size=served.max_batch if served else None,
            )
        )
    default = next((v for v in items if v.default), None)
    return DeploymentOut(
        name=name,
        default_version=default.version if default else None,
        state=default.state if default else "failed",
        versions=items,
    )


@router.post("", status_code=201, response_model=DeploymentOut, summary="Deploy a candidate (a new version)")
async def create(
    body: DeploymentCreate, request: Request, session: SessionDep, owner: Owner, response: Response
) -> DeploymentOut:
    check_name(body.name)
    cand = deployments.candidate_for(session, owner, body.candidate, body.job)
    row = deployments.create(
        session,
        owner=owner,
        name=body.name,
        candidate=cand,
        options=body.model_dump(include=set(deployments.OPTION_KEYS)),
        force=body.force,
    )
    session.commit()
    served = await run_in_threadpool(_manager(request).load, row_dict(row))
    if served.state == "ready":  # a load that fails leaves the previous version serving
        deployments.set_default(session, owner, body.name, row.version)
        session.commit()
        _manager(request).set_default(owner, body.name, row.version)
    _changed(request)
    response.headers["Location"] = f"/v1/deployments/{body.name}"
    return _out(request, owner, body.name, deployments.versions(session, owner, body.name))


@router.get("", response_model=list[DeploymentOut], summary="List deployments")
def list_deployments(request: Request, session: SessionDep, owner: Owner) -> list[DeploymentOut]:
    return [_out(request, owner, name, rows) for name, rows in deployments.listing(session, owner).items()]


@router.get("/{name}", response_model=DeploymentOut, summary="A deployment with its versions")
def read(name: str, request: Request, session: SessionDep, owner: Owner) -> DeploymentOut:
    return _out(request, owner, name, deployments.versions(session, owner, name))


@router.patch("/{name}", response_model=DeploymentOut, summary="Choose the default version or change options")
async def patch(name: str, body: DeploymentPatch, request: Request, session: SessionDep, owner: Owner) -> DeploymentOut:
    rows = deployments.versions(session, owner, name)
    changes = body.model_dump(include=set(deployments.OPTION_KEYS), exclude_none=True)
    if body.default_version is None and not changes:
        raise InvalidOptions("nothing to change: give default_version or serving options")
    mgr = _manager(request)
    if changes:
        target = next((r for r in rows if r.is_default), rows[-1])
        target.options = {**(target.options or {}), **changes}
        session.commit()
        await run_in_threadpool(mgr.load, row_dict(target))
    if body.default_version is not None:
        await _ensure_loaded(request, owner, name, rows, body.default_version)
        deployments.set_default(session, owner, name, body.default_version)
        session.commit()
        mgr.set_default(owner, name, body.default_version)
    _changed(request)
    return _out(request, owner, name, deployments.versions(session, owner, name))


async def _ensure_loaded(request: Request, owner: str, name: str, rows: list[Deployment], version: int) -> None:
    """Load a version before it becomes the default (an older one may be on standby); a version
    that does not load is refused and the current default keeps serving."""
    served = _manager(request).served.get((owner, name), {}).get(version)
    if served is not None and served.state == "ready":
        return
    row = next((r for r in rows if r.version == version), None)
    if row is None:
        return  # set_default says it does not exist
    served = await run_in_threadpool(_manager(request).load, row_dict(row))
    if served.state != "ready":
        raise Conflict(f"version {version} of {name!r} did not load ({served.error}); the default is unchanged")


@router.post("/{name}/rollback", response_model=DeploymentOut, summary="Make the previous version the default")
async def rollback(name: str, request: Request, session: SessionDep, owner: Owner) -> DeploymentOut:
    version = deployments.previous_version(session, owner, name)
    await _ensure_loaded(request, owner, name, deployments.versions(session, owner, name), version)
    deployments.set_default(session, owner, name, version)
    session.commit()
    _manager(request).set_default(owner, name, version)
    _changed(request)
    return _out(request, owner, name, deployments.versions(session, owner, name))


@router.delete("/{name}", status_code=204, summary="Stop serving a deployment (all versions)")
def delete(name: str, request: Request, session: SessionDep, owner: Owner) -> Response:
    deployments.delete(session, owner, name)
    session.commit()
    _manager(request).unload(owner, name)
    _changed(request)
    return Response(status_code=204)
