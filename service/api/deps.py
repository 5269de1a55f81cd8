"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import auth
from service.artifacts import ArtifactStore, get_store
from service.config import Settings, get_settings
from service.db import new_session, session_scope

SESSION_COOKIE = "kiln_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


def principal(request: Request, scope: str = "manage") -> auth.Principal:
    """Who calls, from a Bearer token or the dashboard's session cookie (which needs the CSRF
    header on anything that changes state); Forbidden without `scope`."""
    token = _token(request)
    if token is None:
        return _open()
    return _allowed(auth.authenticate(new_session, token), scope)


async def principal_async(request: Request, scope: str = "manage") -> auth.Principal:
    """principal() for async routes: a token seen lately is answered from the cache, and the
    database is asked in a thread, never on the event loop that serves every other request."""
    token = _token(request)
    if token is None:
        return _open()
    who = auth.cached(token, new_session)
    if who is None:
        who = await run_in_threadpool(auth.authenticate, new_session, token)
    return _allowed(who, scope)


def _open() -> auth.Principal:
    return auth.Principal(owner=get_settings().default_owner, scopes=frozenset({"admin"}))


def _token(request: Request) -> str | None:
    """The caller's token (None while authentication is off)."""
    if not get_settings().auth:
        return None
    header = request.headers.get("authorization")
    if header:
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise auth.Unauthorized("use 'Authorization: Bearer <token>'")
        return token.strip()
    if cookie := request.cookies.get(SESSION_COOKIE):
        if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != auth.csrf_token(cookie):
            raise auth.Forbidden("missing or wrong CSRF token (send the X-CSRF-Token header the dashboard gives)")
        return cookie
    raise auth.Unauthorized(
        "authentication required: send 'Authorization: Bearer <token>' "
        "(kiln up prints the admin token and keeps it in DATA_DIR/admin-token)"
    )


def _allowed(who: auth.Principal, scope: str) -> auth.Principal:
    if not who.allows(scope):
        raise auth.Forbidden(f"this token's scopes ({', '.join(sorted(who.scopes))}) do not allow {scope}")
    return who


def _manager_principal(request: Request) -> auth.Principal:
    return principal(request, "manage")


def _owner(who: Annotated[auth.Principal, Depends(_manager_principal)]) -> str:
    return who.owner


# scope="function": commit before the response is sent, so a client's next request sees the change.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
Owner = Annotated[str, Depends(_owner)]
Caller = Annotated[auth.Principal, Depends(_manager_principal)]
