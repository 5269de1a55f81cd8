"""The dashboard's pages: server-rendered HTML read through the same stores the /v1 API uses.

Pages only read. Every action on a page (upload, start, cancel, retry, deploy, roll back,
undeploy, try it) is a fetch() from the browser to the /v1 or /v2 API, so the dashboard can never
do what the API would refuse, and authentication added to the API covers it as well."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from service import deployments, jobs, registry
from service.api import deployments as deployments_api
from service.api.deps import SESSION_COOKIE, SessionDep
from service.dashboard import assets, formatting, session, tryit, views
from service.dashboard.session import Viewer, ViewerDep
from service.errors import KilnError, Unauthorized
from service.options import GPU_TARGETS, POLICIES, PRECISIONS, TARGETS
from service.schemas import MAX_OFFSET, JobOut, ModelOut
from service.serving.manager import row_dict
from service.tables import CandidateRow

router = APIRouter(include_in_schema=False)
router.include_router(session.router)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters.update(formatting.FILTERS)
templates.env.globals.update(
    static=assets.url,
    statuses=jobs.STATUSES,
    targets=TARGETS,
    gpu_targets=GPU_TARGETS,
    precisions=PRECISIONS,
    policies=POLICIES,
)

PAGE_SIZE = 25
LOG_TAIL = 400  # log lines a job page starts with; later ones arrive on the event stream
# Scripts only from our own files (no inline script, no CDN); inline styles are used for bar widths.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)


def render(request: Request, template: str, viewer: Viewer, status_code: int = 200, **context: Any) -> HTMLResponse:
    # The page's fetch() helper (static/kiln.js) sends csrf_token with every change it asks the API for.
    response = templates.TemplateResponse(
        request, template, {"viewer": viewer, "csrf_token": viewer.csrf_token, **context}, status_code=status_code
    )
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"  # pages are live views
    return response


def error_page(request: Request, viewer: Viewer, exc: KilnError) -> HTMLResponse:
    return render(request, "error.html", viewer, status_code=exc.status, nav=None, error=exc)


def sign_in_page(request: Request, viewer: Viewer) -> HTMLResponse:
    """In place of any page while nobody (or a token without the manage scope) is signed in."""
    tried = request.cookies.get(SESSION_COOKIE) or request.headers.get("authorization")
    refused = viewer.refused or Unauthorized("authentication required")
    # "authentication required" says nothing to someone who has not tried yet; a refused token does
    return render(
        request,
        "sign_in.html",
        viewer,
        status_code=refused.status,
        nav=None,
        problem=refused if tried or refused.status != 401 else None,
    )


@router.get(f"{assets.PREFIX}/{{name}}")
def static_file(name: str) -> Response:
    return assets.response(name)


@router.get("/", response_class=HTMLResponse)
def jobs_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    status: str = "",
    model: str = "",
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE,
    highlight: str = "",
) -> HTMLResponse:
    if viewer.refused:
        return sign_in_page(request, viewer)
    owner, problem = viewer.owner, None
    if status and status not in jobs.STATUSES:
        problem, status = f"unknown status {status!r}; use one of {', '.join(jobs.STATUSES)}", ""
    items, total = jobs.listing(session, owner, status=status or None, model=model or None, limit=limit, offset=offset)
    models, _ = registry.list_models(session, owner, 500, 0)
    rows = [views.job_row(j, jobs.waiting_reason(session, j)) for j in items]
    return render(
        request,
        "jobs.html",
        viewer,
        nav="jobs",
        rows=rows,
        total=total,
        offset=offset,
        page_size=limit,
        status=status,
        model=model,
        highlight=highlight,
        model_names=[m.name for m in models],
        problem=problem,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, session: SessionDep, viewer: ViewerDep) -> HTMLResponse:
    if viewer.refused:
        return sign_in_page(request, viewer)
    try:
        job = jobs.get(session, viewer.owner, job_id)
    except KilnError as exc:
        return error_page(request, viewer, exc)
    out = JobOut.of(job)
    out.waiting = jobs.waiting_reason(session, job)
    page = views.job_page(out, job.report)
    log = jobs.logs(session, job_id, after=max(job.log_seq - LOG_TAIL, 0))
    return render(request, "job.html", viewer, nav="jobs", page=page, job=page.job, log=log, log_seq=job.log_seq)


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, session: SessionDep, viewer: ViewerDep) -> HTMLResponse:
    if viewer.refused:
        return sign_in_page(request, viewer)
    models, total = registry.list_models(session, viewer.owner, 500, 0)
    return render(request, "models.html", viewer, nav="models", models=[ModelOut.of(m) for m in models], total=total)


@router.get("/deployments", response_class=HTMLResponse)
def deployments_page(request: Request, session: SessionDep, viewer: ViewerDep) -> HTMLResponse:
    if viewer.refused:
        return sign_in_page(request, viewer)
    listed = deployments_api.list_deployments(request, session, viewer.owner)
    rows = deployments.listing(session, viewer.owner)
    cards = []
    for dep in listed:
        versions = rows[dep.name]
        current = next((r for r in versions if r.is_default), versions[-1])
        jobs_of = {
            v.candidate: row.job_id for v in dep.versions if (row := session.get(CandidateRow, v.candidate)) is not None
        }
        cards.append(
            {
                "dep": dep,
                "jobs": jobs_of,
                "example": tryit.example_request(row_dict(current)["signature"]),
                "can_roll_back": any(v.version < (dep.default_version or 0) for v in dep.versions),
            }
        )
    return render(request, "deployments.html", viewer, nav="deployments", cards=cards)
