"""The one place that turns errors into HTTP answers: RFC 9457 problem details on /v1 (and
everything else), `{"error": "..."}` on /v2 as the Open Inference Protocol wants."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import KilnError

logger = logging.getLogger("kiln.api")
PROBLEM = "application/problem+json"


MAX_DETAIL = 500  # characters: a detail that quotes the input (a 1 MB id, say) quotes only its start


def problem(request: Request, status: int, title: str, detail: str, **extra: object) -> JSONResponse:
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + f"... ({len(detail) - MAX_DETAIL} more characters)"
    headers = {"WWW-Authenticate": 'Bearer realm="kiln"'} if status == 401 else None
    if request.url.path.startswith("/v2"):
        return JSONResponse({"error": detail}, status_code=status, headers=headers)
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path[:200],
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return "; ".join(parts) or "the request is not valid"


def install(app: FastAPI) -> None:
    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s: %s", request.method, request.url.path, exc.detail)
        return problem(
            request,
            exc.status,
            exc.title,
            exc.detail,
            **{k: v for k, v in exc.extra.items() if isinstance(v, (str, int, float, bool))},
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(request, 422, "Invalid request", _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return problem(request, exc.status_code, getattr(exc, "title", "Error"), detail)

    from sqlalchemy.exc import OperationalError

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> JSONResponse:
        logger.warning(
            "database unavailable on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0][:200]
        )
        return problem(request, 503, "Service unavailable", "the database cannot be reached right now; try again")

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return problem(request, 400, "Invalid request", "the request body nests too deeply")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(request, 500, "Internal error", "an internal error occurred; the server log has the details")
