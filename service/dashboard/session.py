"""Who is looking at the dashboard, and signing in and out.

The dashboard uses the API's own authentication (service/api/deps.py `principal`): a browser
holds its API token in the HttpOnly `kiln_session` cookie, and sends the CSRF token derived from it
(service.auth.csrf_token, given to the page in a <meta> tag) with every request that changes
state. Signing in only checks a token and sets that cookie; nothing is stored on the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service import auth
from service.api.deps import CSRF_HEADER, SESSION_COOKIE, principal
from service.config import get_settings
from service.db import new_session
from service.errors import BadRequest, KilnError

router = APIRouter(prefix="/dashboard/session", include_in_schema=False)


@dataclass
class Viewer:
    """The caller of a page: a principal, or the reason there is none (the page then asks to sign in)."""

    who: auth.Principal | None
    refused: KilnError | None
    auth_on: bool
    csrf_token: str = ""

    @property
    def owner(self) -> str:
        assert self.who is not None, "a refused viewer has no owner"
        return self.who.owner


def viewer(request: Request) -> Viewer:
    auth_on = get_settings().auth
    try:
        who = principal(request, "manage")
    except KilnError as exc:  # Unauthorized or Forbidden: shown as the sign-in page with the reason
        return Viewer(who=None, refused=exc, auth_on=auth_on)
    cookie = request.cookies.get(SESSION_COOKIE)
    return Viewer(who=who, refused=None, auth_on=auth_on, csrf_token=auth.csrf_token(cookie) if cookie else "")


ViewerDep = Annotated[Viewer, Depends(viewer)]


@router.post("")
async def sign_in(request: Request) -> Response:
    """Check a token and keep it in the session cookie. JSON only: a cross-site form cannot send
    application/json without a CORS preflight, which Kiln refuses unless configured."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest('send the token as JSON: {"token": "kiln_..."}')
    try:
        token = str((await request.json())["token"]).strip()
    except (ValueError, KeyError, TypeError):
        raise BadRequest('send the token as JSON: {"token": "kiln_..."}') from None
    who = auth.authenticate(new_session, token)
    if not who.allows("manage"):
        raise auth.Forbidden(
            f"this token's scopes ({', '.join(sorted(who.scopes))}) do not allow the dashboard; "
            "it needs manage or admin"
        )
    response = JSONResponse({"owner": who.owner, "scopes": sorted(who.scopes)})
    response.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https"
    )
    return response


@router.delete("", status_code=204)
def sign_out(request: Request) -> Response:
    """Forget the session cookie (with the CSRF header, like every other change)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and request.headers.get(CSRF_HEADER) != auth.csrf_token(cookie):
        raise auth.Forbidden("missing or wrong CSRF token")
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
