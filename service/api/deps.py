"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

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
    settings = get_settings()
    if not settings.auth:
        return auth.Principal(owner=settings.default_owner, scopes=frozenset({"admin"}))
    header = request.headers.get("authorization")
    if header:
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise auth.Unauthorized("use 'Authorization: Bearer <token>'")
        token = token.strip()
    elif cookie := request.cookies.get(SESSION_COOKIE):
        token = cookie
        if request.method not in SAFE_METHODS and request.headers.get(CSRF_HEADER) != auth.csrf_token(cookie):
            raise auth.Forbidden("missing or wrong CSRF token (send the X-CSRF-Token header the dashboard gives)")
    else:
        raise auth.Unauthorized("authentication required: send 'Authorization: Bearer <token>' "
                                "(kiln up prints the admin token and keeps it in DATA_DIR/admin-token)")
    who = auth.authenticate(new_session, token)
    if not who.allows(scope):
        raise auth.Forbidden(f"this token's scopes ({', '.join(sorted(who.scopes))}) do not allow {scope}")
    return who


def _manager_principal(request: Request) -> auth.Principal:
    return principal(request, "manage")


def _admin_principal(request: Request) -> auth.Principal:
    return principal(request, "admin")


def _owner(who: Annotated[auth.Principal, Depends(_manager_principal)]) -> str:
    return who.owner


# scope="function": commit before the response is sent, so a client's next request sees the change.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
Owner = Annotated[str, Depends(_owner)]
Caller = Annotated[auth.Principal, Depends(_manager_principal)]
Admin = Annotated[auth.Principal, Depends(_admin_principal)]
