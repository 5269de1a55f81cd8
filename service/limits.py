"""The request gate, in front of every route: who calls and how much they may send are decided from
the headers, before any body is read.

- Authentication: a request that may carry a body (anything but GET, HEAD and OPTIONS) to a route
  that needs a token is answered 401 from its headers alone when its token is missing, unknown or
  revoked; the body is never read. (Scopes and the dashboard's CSRF check stay with the routes.)
- Body limits per kind of route: `/v2` inference (`KILN_MAX_INFER_BYTES`), model uploads
  (`POST /v1/models`, `KILN_MAX_UPLOAD_BYTES`) and everything else, JSON and dashboard forms
  (`KILN_MAX_JSON_BYTES`, 1 MiB). Over it is a 413: before the body is read when `Content-Length`
  says so, while it streams when it does not.
- Slow bodies: a client that sends nothing for `KILN_BODY_TIMEOUT_S` while its body is being read
  gets a 408 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth
from service.api.deps import SESSION_COOKIE
from service.config import Settings
from service.db import new_session

SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
# Routes open without a token (health checks, the dashboard's sign-in, which carries the token in its body).
OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/", "/dashboard/session")


class RequestGate:
    """Authentication from headers, then per-route body limits and a timeout between body chunks."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, method: str, path: str) -> int:
        s = self.settings
        if path.startswith("/v2"):
            return s.max_infer_bytes
        if method == "POST" and path.rstrip("/") == "/v1/models":
            return s.max_upload_bytes
        return s.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = dict(scope.get("headers") or [])
        if self.settings.auth and method.encode() not in SAFE_METHODS and not path.startswith(OPEN_PATHS):
            refused = await _refusal(headers)
            if refused is not None:
                await answer(scope, send, 401, "Unauthorized", refused)
                return
        limit = self.limit_for(method, path)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await answer(scope, send, 413, "Payload too large", _detail(limit))
            return
        seen = 0
        started = False
        timeout = self.settings.body_timeout_s

        body_done = False

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body, receive() waits for a disconnect (a streamed response): untimed
                return await receive()
            try:
                async with asyncio.timeout(timeout):  # no task per chunk, unlike wait_for: /v2 is a hot path
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout) as exc:  # raised by a route that read the body itself
            if not started:
                await answer(scope, send, exc.status_code, exc.title, exc.detail)


async def _refusal(headers: dict[bytes, bytes]) -> str | None:
    """Why a request's headers do not authenticate it, or None when they do."""
    header = headers.get(b"authorization")
    token: str | None
    if header is not None:
        kind, _, token_bytes = header.partition(b" ")
        if kind.lower() != b"bearer" or not token_bytes.strip():
            return "use 'Authorization: Bearer <token>'"
        try:
            token = token_bytes.strip().decode("ascii")
        except UnicodeDecodeError:
            return "the token is not a Kiln token"
    else:
        token = _cookie(headers.get(b"cookie", b""))
        if token is None:
            return (
                "authentication required: send 'Authorization: Bearer <token>' "
                "(kiln up prints the admin token and keeps it in DATA_DIR/admin-token)"
            )
    try:
        if auth.cached(token, new_session) is None:
            await run_in_threadpool(auth.authenticate, new_session, token)
    except auth.Unauthorized as exc:
        return exc.detail
    return None


def _cookie(raw: bytes) -> str | None:
    for part in raw.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value
    return None


def _detail(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


async def answer(scope: Scope, send: Send, status: int, title: str, detail: str) -> None:
    """A problem detail (or the protocol's `{"error"}` on /v2), and the connection closed."""
    v2 = scope.get("path", "").startswith("/v2")
    body = (
        {"error": detail}
        if v2
        else {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope.get("path", "")[:200],
        }
    )
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json" if v2 else b"application/problem+json"),
        (b"content-length", str(len(data)).encode()),
        (b"connection", b"close"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="kiln"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body crosses its limit. An HTTPException, because
    FastAPI re-raises those from its body parser (any other error there becomes a 400 "error
    parsing the body"), so the app's handlers answer it as a 413."""

    title = "Payload too large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _detail(limit))


class BodyTimeout(HTTPException):
    """Raised from `receive` when the client sent nothing for too long in the middle of its body."""

    title = "Request timeout"

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body stalled: nothing arrived for {seconds:g} s")
