"""/v2: the Open Inference Protocol (KServe v2) REST API, with Triton's binary tensor extension.

`/infer` reads the raw body itself: tritonclient's synchronous client sends no Content-Type."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from service import __version__, metrics
from service.api.deps import principal, principal_async
from service.errors import InvalidInput, KilnError, NotFound, Overloaded, Unloaded
from service.runtimes.torchscript import telling_line
from service.serving import protocol
from service.serving.manager import Manager, Served, infer

router = APIRouter(prefix="/v2", tags=["inference (v2)"])
logger = logging.getLogger("kiln.api")
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def manager(request: Request) -> Manager:
    return request.app.state.manager


def owner(request: Request) -> str:
    """The caller's team; /v2 needs the `infer` scope (or more)."""
    return principal(request, "infer").owner


@router.get("/health/live", summary="The server is alive")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Every deployment this server should serve is ready")
def ready(request: Request) -> JSONResponse:
    ok = manager(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("", summary="Server metadata")
def server_metadata() -> dict:
    return {"name": "kiln", "version": __version__, "extensions": ["binary_tensor_data"]}


def _versions(request: Request, name: str) -> list[int]:
    return sorted(s.version for s in manager(request).all() if s.name == name and s.owner == owner(request))


@router.get("/models/{name}", summary="Model metadata (default version)")
def model_metadata(name: str, request: Request) -> dict:
    return manager(request).resolve(owner(request), name).metadata(_versions(request, name))


@router.get("/models/{name}/versions/{version}", summary="Model metadata")
def version_metadata(name: str, version: str, request: Request) -> dict:
    return manager(request).resolve(owner(request), name, _version(version)).metadata(_versions(request, name))


@router.get("/models/{name}/ready", summary="The default version is ready")
def model_ready(name: str, request: Request) -> JSONResponse:
    return _ready(manager(request).resolve(owner(request), name))


@router.get("/models/{name}/versions/{version}/ready", summary="The version is ready")
def version_ready(name: str, version: str, request: Request) -> JSONResponse:
    return _ready(manager(request).resolve(owner(request), name, _version(version)))


def _ready(served: Served) -> JSONResponse:
    ok = served.state == "ready"
    return JSONResponse(
        {"name": served.name, "version": str(served.version), "ready": ok}, status_code=200 if ok else 503
    )


def _version(text: str) -> int:
    if not text.isdigit():
        raise NotFound(f"version {text!r} does not exist (versions are numbers)")
    return int(text)


@router.post("/models/{name}/infer", summary="Inference on the default version")
async def infer_default(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on one version")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, _version(version))


async def _infer(request: Request, name: str, version: int | None) -> Response:
    who = await principal_async(request, "infer")
    served = manager(request).resolve(who.owner, name, version)
    labels = (served.name, str(served.version))
    (served.batcher.m_requests if served.batcher is not None else metrics.REQUESTS.labels(*labels)).inc()
    try:
        body = await request.body()
        req = _request(served, body, request)
        try:
            outputs = await infer(served, req.inputs)
        except Unloaded:
            if version is not None:
                raise
            # the default this request was routed to was replaced meanwhile: run it on the new one
            served = manager(request).resolve(who.owner, name, None)
            req = _request(served, body, request)
            outputs = await infer(served, req.inputs)
        if req.outputs is not None:
            outputs = {n: outputs[n] for n in req.outputs}
        content, headers = protocol.encode(served.name, str(served.version), req, outputs, served.output_dtypes)
        return Response(content, headers=headers)
    except KilnError as exc:
        metrics.FAILURES.labels(*labels, str(exc.status)).inc()
        raise
    except HTTPException as exc:  # the body limit, crossed while the body streamed in (413)
        metrics.FAILURES.labels(*labels, str(exc.status_code)).inc()
        raise
    except Exception as exc:
        metrics.FAILURES.labels(*labels, "500").inc()
        raise KilnError(f"inference failed: {_reason(exc)}") from exc


def _request(served: Served, body: bytes, request: Request) -> protocol.InferRequest:
    """The body parsed for this version, its inputs and asked-for outputs checked against it."""
    req = protocol.parse(body, request.headers.get(protocol.HEADER_LENGTH), served.input_dtypes)
    served.check(req.inputs)
    if req.outputs is not None:
        unknown = [o for o in req.outputs if o not in served.output_dtypes]
        if unknown:
            raise InvalidInput(
                f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(served.output_dtypes)}"
            )
    return req


def _reason(exc: Exception) -> str:
    """One line saying why a runtime failed."""
    line = telling_line(str(exc))
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


async def infer_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """Inference requests (POST /v2/models/{name}[/versions/{version}]/infer) as a bare ASGI app,
    which the app calls ahead of the framework's routing, dependency and exception layers (inside
    the request gate, so authentication from the headers, body limits and the body timeout apply
    as to every route): the same handler, checks and answers as the routes above, which stay for
    the OpenAPI document, with less bookkeeping per request."""
    match = INFER_PATH.match(scope["path"])
    assert match is not None, "called for inference paths only"
    request = Request(scope, receive)
    try:
        name, version = unquote(match.group(1)), match.group(2)
        response = await _infer(request, name, None if version is None else _version(unquote(version)))
    except Overloaded as exc:  # a refusal the client should retry, not a fault: no log line per request
        response = _error(exc.status, exc.detail)
        response.headers["Retry-After"] = "1"
    except KilnError as exc:
        if exc.status >= 500:
            logger.error("POST %s: %s", scope["path"][:200], exc.detail)
        response = _error(exc.status, exc.detail)
    except HTTPException as exc:  # the body limit or timeout, met while the body streamed in
        response = _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else str(exc.detail))
    except Exception:
        logger.exception("unhandled error on POST %s", scope["path"][:200])
        response = _error(500, "an internal error occurred; the server log has the details")
    await response(scope, receive, send)


def _error(status: int, detail: str) -> JSONResponse:
    """The protocol's error body, as service/api/errors.py gives it on /v2."""
    from service.api.errors import MAX_DETAIL

    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + f"... ({len(detail) - MAX_DETAIL} more characters)"
    headers = {"WWW-Authenticate": 'Bearer realm="kiln"'} if status == 401 else None
    return JSONResponse({"error": detail}, status_code=status, headers=headers)
