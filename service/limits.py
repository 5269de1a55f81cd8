"""Request body limits, enforced before the body is read (Content-Length) and while it streams."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Answers 413 when a request body is larger than its limit: `infer_bytes` on /v2, `upload_bytes`
    (model uploads) everywhere else."""

    def __init__(self, app: ASGIApp, upload_bytes: int, infer_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.infer_bytes = infer_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.infer_bytes if scope.get("path", "").startswith("/v2") else self.upload_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(scope, send, limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:  # raised by a route that read the body itself, outside the app's handlers
            if not started:
                await _reject(scope, send, limit)


def _detail(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


async def _reject(scope: Scope, send: Send, limit: int) -> None:
    detail = _detail(limit)
    v2 = scope.get("path", "").startswith("/v2")
    body = {"error": detail} if v2 else {"type": "about:blank", "title": "Payload too large", "status": 413,
                                          "detail": detail, "instance": scope.get("path", "")}
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json" if v2 else b"application/problem+json"),
                            (b"content-length", str(len(data)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body crosses its limit. An HTTPException, because
    FastAPI re-raises those from its body parser (any other error there becomes a 400 "error
    parsing the body"), so the app's handlers answer it as a 413."""

    title = "Payload too large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _detail(limit))
