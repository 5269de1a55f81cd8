"""/v1/tokens: create, list and revoke API tokens."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from service import auth
from service.api.deps import Caller, SessionDep
from service.tables import ApiToken

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    scopes: list[str] = Field(
        default_factory=lambda: ["infer"],
        max_length=4,
        description="infer (the /v2 API only), manage (the /v1 API), admin, metrics "
        "(only /metrics: a Prometheus scraper's token)",
    )
    owner: str | None = Field(None, max_length=100, description="team; only an admin may name another")


class TokenOut(BaseModel):
    id: str
    name: str
    owner: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    token: str | None = Field(None, description="the token itself: shown once, at creation")

    @classmethod
    def of(cls, row: ApiToken, token: str | None = None) -> TokenOut:
        return cls(
            id=row.id,
            name=row.name,
            owner=row.owner,
            prefix=row.prefix,
            scopes=row.scopes,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            token=token,
        )


@router.post("", status_code=201, response_model=TokenOut, summary="Create a token (shown once)")
def create(body: TokenCreate, session: SessionDep, who: Caller) -> TokenOut:
    owner = body.owner or who.owner
    if owner != who.owner and not who.allows("admin"):
        raise auth.Forbidden("only an admin token can create tokens for another team")
    for wide in ("admin", "metrics"):  # metrics shows every team's series
        if wide in body.scopes and not who.allows("admin"):
            raise auth.Forbidden(f"only an admin token can create {wide} tokens")
    row, token = auth.create(session, owner=owner, name=body.name, scopes=body.scopes)
    return TokenOut.of(row, token)


@router.get("", response_model=list[TokenOut], summary="List tokens (an admin sees every team's)")
def listing(session: SessionDep, who: Caller) -> list[TokenOut]:
    return [TokenOut.of(r) for r in auth.listing(session, who)]


@router.delete("/{token_id}", status_code=204, summary="Revoke a token")
def revoke(token_id: str, session: SessionDep, who: Caller) -> Response:
    auth.revoke(session, who, token_id)
    return Response(status_code=204)
