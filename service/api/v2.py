"""/v2: the Open Inference Protocol (KServe v2) REST API, with Triton's binary tensor extension.

`/infer` reads the raw body itself: tritonclient's synchronous client sends no Content-Type."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service import __version__, metrics
from service.api.deps import principal, principal_async
from service.errors import InvalidInput, KilnError, NotFound, Unloaded
from service.runtimes.torchscript import telling_line
from service.serving import protocol
from service.serving.manager import Manager, Served, infer

router = APIRouter(prefix="/v2", tags=["inference (v2)"])


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
    return JSONResponse({"name": served.name, "version": str(served.version), "ready": ok},
                        status_code=200 if ok else 503)


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
    metrics.REQUESTS.labels(*labels).inc()
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
            raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; the model has "
                               f"{', '.join(served.output_dtypes)}")
    return req


def _reason(exc: Exception) -> str:
    """One line saying why a runtime failed."""
    line = telling_line(str(exc))
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__

