"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), beside /v2 over HTTP:
the same deployments, authentication (a bearer token in the `authorization` metadata), batching,
checks and error messages, so that `tritonclient.grpc` works unchanged.

The server is grpc's synchronous one, with threads of its own: a call is handled on one of its
threads, which hands the checked request to the deployment's batcher (the same queue HTTP requests
join) and waits for the answer, or, when nothing is queued and an instance is free, runs it itself;
the API's event loop is not involved. Raw input contents are read in place (np.frombuffer);
outputs go out as raw contents. Errors carry the HTTP problem's detail with the matching gRPC
status code.

Where the time goes (MLP, one sequential Python client, shared 2-core machine; bench/grpc_floor.py
times every piece in interleaved rounds): grpc's synchronous server is the floor. An echo server
answering a fixed ModelInferResponse takes 0.6-0.7 ms a call from a bare grpc stub, about what a
whole HTTP JSON inference takes (0.7-0.9 ms): grpc spends some 0.45 ms of CPU and 20 context
switches a call across its polling thread, a pool thread and grpc-core's event-engine threads.
tritonclient.grpc adds 0.07-0.10 ms over a bare stub. ModelInfer adds 0.45-0.55 ms over the echo:
the handler takes 0.10-0.13 ms called in a loop but 0.25-0.35 ms of CPU here, where each call runs
with cold caches; of that, about 0.15 ms is the batcher and its metrics (manager.infer_blocking
beyond the run), as much again the runtime's run, and 0.05-0.09 ms the authentication, parsing,
checks and response. A pool that hands each call to the thread that went idle last,
grpc's optimization_target, grpc.aio (on the echo server) and one intra-op thread made no
measurable difference.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np

from service import auth, metrics
from service.config import get_settings
from service.db import new_session
from service.errors import InvalidInput, KilnError, NotFound, Unloaded
from service.serving import protocol
from service.serving.manager import Manager, Served, infer_blocking
from service.serving.proto import inference_pb2 as pb

logger = logging.getLogger("kiln.grpc")

# HTTP status of a Kiln error -> gRPC status code
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# typed contents field per Kiln dtype, for requests that send values rather than raw bytes
CONTENTS = {
    "bool": "bool_contents",
    "int8": "int_contents",
    "int16": "int_contents",
    "int32": "int_contents",
    "int64": "int64_contents",
    "uint8": "uint_contents",
    "uint16": "uint_contents",
    "uint32": "uint_contents",
    "uint64": "uint64_contents",
    "float16": "fp32_contents",
    "bfloat16": "fp32_contents",
    "float32": "fp32_contents",
    "float64": "fp64_contents",
}


def _principal(context: grpc.ServicerContext, scope: str = "infer") -> auth.Principal:
    """The caller, from a token seen lately (no database) or else the database (on this thread)."""
    settings = get_settings()
    if not settings.auth:
        return auth.Principal(owner=settings.default_owner, scopes=frozenset({"admin"}))
    header = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
    if not header:
        raise auth.Unauthorized("authentication required: send the metadata 'authorization: Bearer <token>'")
    kind, _, token = str(header).partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise auth.Unauthorized("use 'authorization: Bearer <token>'")
    who = auth.cached(token.strip(), new_session)
    if who is None:
        who = auth.authenticate(new_session, token.strip())
    if not who.allows(scope):
        raise auth.Forbidden(f"this token's scopes ({', '.join(sorted(who.scopes))}) do not allow {scope}")
    return who


def _version(text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise NotFound(f"version {text!r} does not exist (versions are numbers)")
    return int(text)


def inputs_of(request: Any, served: Served) -> dict[str, np.ndarray]:
    """The request's tensors, from raw contents (what tritonclient sends) or typed contents."""
    expected = served.input_dtypes
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw input contents for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        _, _, dtype, count = protocol.check_input(tensor.name, shape, tensor.datatype, expected, inputs)
        if raw:
            inputs[tensor.name] = protocol.from_raw(tensor.name, raw[i], dtype, shape, count)
            continue
        values = getattr(tensor.contents, CONTENTS[dtype])
        if len(values) != count:
            raise InvalidInput(f"input {tensor.name!r}: {len(values)} values given, shape {shape} needs {count}")
        inputs[tensor.name] = np.asarray(values, dtype=protocol.np_dtype(dtype)).reshape(shape)
    if not inputs:
        raise InvalidInput("the request needs at least one input tensor")
    served.check(inputs)
    return inputs


SERVICE = "inference.GRPCInferenceService"
# method -> (request type, response type)
METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def handler(service: InferenceService) -> grpc.GenericRpcHandler:
    """The protocol's unary methods at their paths (/inference.GRPCInferenceService/<Method>)."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(service, name), request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )
            for name, (req, resp) in METHODS.items()
        },
    )


class InferenceService:
    """The health, metadata and inference calls of the protocol, over the API's deployments (the
    methods bear the protocol's CamelCase names)."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def _guard(self, context: grpc.ServicerContext, exc: Exception) -> Any:
        """Answer an error as a status (context.abort raises, ending the call)."""
        if isinstance(exc, KilnError):
            context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.detail)
        logger.exception("gRPC call failed")
        context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}")

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.manager.ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="kiln", version=_kiln_version(), extensions=["binary_tensor_data"])

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            who = _principal(context)
            served = self.manager.resolve(who.owner, request.name, _version(request.version))
            return pb.ModelReadyResponse(ready=served.state == "ready")
        except Exception as exc:  # noqa: BLE001 - answered as a status
            return self._guard(context, exc)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            who = _principal(context)
            served = self.manager.resolve(who.owner, request.name, _version(request.version))
            versions = sorted(s.version for s in self.manager.all() if s.name == request.name and s.owner == who.owner)
            meta = served.metadata(versions)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )
        except Exception as exc:  # noqa: BLE001 - answered as a status
            return self._guard(context, exc)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        labels: tuple[str, str] | None = None
        try:
            who = _principal(context)
            version = _version(request.model_version)
            served = self.manager.resolve(who.owner, request.model_name, version)
            labels = (served.name, str(served.version))
            (served.batcher.m_requests if served.batcher else metrics.REQUESTS.labels(*labels)).inc()
            try:
                outputs = infer_blocking(served, inputs_of(request, served))
            except Unloaded:
                if version is not None:
                    raise
                # the default was replaced while this request waited: run it on the new one
                served = self.manager.resolve(who.owner, request.model_name, None)
                outputs = infer_blocking(served, inputs_of(request, served))
            wanted = [o.name for o in request.outputs]
            unknown = [o for o in wanted if o not in served.output_dtypes]
            if unknown:
                raise InvalidInput(
                    f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(served.output_dtypes)}"
                )
            response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
            for name in wanted or list(outputs):
                arr = outputs[name]
                dtype = served.output_dtypes.get(name) or str(arr.dtype)
                response.outputs.add(name=name, datatype=protocol.DTYPE_TO_V2.get(dtype, "FP32"), shape=list(arr.shape))
                response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
            return response
        except Exception as exc:  # noqa: BLE001 - answered as a status
            if labels is not None:
                metrics.FAILURES.labels(*labels, str(getattr(exc, "status", 500))).inc()
            return self._guard(context, exc)


def _kiln_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class GrpcServer:
    """The running gRPC server; `stop` is awaitable from the API's shutdown."""

    def __init__(self, server: grpc.Server) -> None:
        self.server = server

    async def stop(self, grace: float) -> None:
        done = self.server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, grace + 5)


async def start(manager: Manager, host: str, port: int) -> GrpcServer | None:
    """Serve the protocol on host:port (None, with a logged reason, when the port cannot be bound)."""
    limit = get_settings().max_infer_bytes
    # enough threads for many concurrent callers to wait on the batcher together (a waiting
    # thread costs no CPU); the batcher, not this pool, bounds the work
    workers = max(32, 16 * (os.cpu_count() or 1))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    server.add_generic_rpc_handlers((handler(InferenceService(manager)),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        logger.error("gRPC inference endpoint not started: cannot listen on %s (%s)", address, exc)
        return None
    if not bound:
        logger.error("gRPC inference endpoint not started: cannot listen on %s", address)
        return None
    server.start()
    logger.info("gRPC inference endpoint (KServe v2) on %s", address)
    return GrpcServer(server)
