"""API tokens: creation (shown once, stored as sha256), lookup with a short cache, revocation,
and the admin token a fresh installation starts with.

Scopes: `infer` (the /v2 inference API only), `manage` (the /v1 API for the token's own team),
`admin` (manage, plus tokens for any team), `metrics` (only /metrics, which shows every team's
series, so team tokens cannot read it: a scraper's token). Every model, job and deployment belongs to the team
(owner) of the token that created it; other teams get 404 for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import BadRequest, Forbidden, NotFound, Unauthorized
from service.tables import ApiToken, new_id, now

logger = logging.getLogger("kiln.auth")
__all__ = ["Forbidden", "Principal", "Unauthorized", "authenticate", "bootstrap", "create", "csrf_token"]
SCOPES = ("infer", "manage", "admin", "metrics")
PREFIX = "kiln_"
ADMIN_TOKEN_FILE = "admin-token"
CACHE_S = 5.0  # a revoked token stops working within this many seconds on every replica


@dataclass(frozen=True)
class Principal:
    """Who is calling: a team (owner) and what it may do."""

    owner: str
    scopes: frozenset[str]
    token_id: str | None = None

    def allows(self, scope: str) -> bool:
        if "admin" in self.scopes:
            return True
        return scope in self.scopes or (scope == "infer" and "manage" in self.scopes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(session: Session, *, owner: str, name: str, scopes: list[str]) -> tuple[ApiToken, str]:
    """A new token; returns (row, the token text, which is not stored anywhere)."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise BadRequest(f"unknown scope(s) {', '.join(bad) or '(none)'}; use infer, manage, admin or metrics")
    if not owner or len(owner) > 100:
        raise BadRequest("owner (team) must be 1-100 characters")
    token = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=new_id(), owner=owner, name=name, prefix=token[:12], token_hash=hash_token(token), scopes=sorted(set(scopes))
    )
    session.add(row)
    session.flush()
    return row, token


def revoke(session: Session, principal: Principal, token_id: str) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None or (row.owner != principal.owner and not principal.allows("admin")):
        raise NotFound(f"token {token_id} does not exist")
    row.revoked_at = row.revoked_at or now()
    _cache.clear()
    return row


def listing(session: Session, principal: Principal) -> list[ApiToken]:
    q = select(ApiToken).order_by(ApiToken.created_at)
    if "admin" not in principal.scopes:
        q = q.where(ApiToken.owner == principal.owner)
    return list(session.scalars(q).all())


class _Cache:
    def __init__(self) -> None:
        self._items: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self._refreshing: set[str] = set()

    def get(self, key: str) -> tuple[bool, Principal | None]:
        hit, stale, principal = self.lookup(key)
        return hit and not stale, principal

    def lookup(self, key: str) -> tuple[bool, bool, Principal | None]:
        """(known, stale, principal): a stale entry is past its time by less than CACHE_S more."""
        with self._lock:
            item = self._items.get(key)
        if item is None:
            return False, False, None
        left = item[0] - time.monotonic()
        if left > 0:
            return True, False, item[1]
        if left > -CACHE_S:
            return True, True, item[1]
        return False, False, None

    def claim_refresh(self, key: str) -> bool:
        """Whether the caller is the one to look the key up again (one lookup at a time per key)."""
        with self._lock:
            if key in self._refreshing:
                return False
            self._refreshing.add(key)
            return True

    def refreshed(self, key: str) -> None:
        with self._lock:
            self._refreshing.discard(key)

    def put(self, key: str, value: Principal | None) -> None:
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[key] = (time.monotonic() + CACHE_S, value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_cache = _Cache()


def cached(token: str, session_factory: Callable[[], Session] | None = None) -> Principal | None:
    """The principal for a token seen lately, without asking the database; None if not known
    (a token known to be bad raises Unauthorized).

    With `session_factory`, an entry past its time by less than CACHE_S more is still answered,
    while one thread looks the token up again in the background: when a busy token's entry ran
    out, every request in flight went to the database at once (each writing last_used_at), which
    stalled the whole server for 100 ms and more every CACHE_S. A revoked token stops working once
    that lookup is back, a few milliseconds after CACHE_S."""
    if not token.startswith(PREFIX):
        raise Unauthorized("the token is not a Kiln token")
    key = hash_token(token)
    hit, stale, principal = _cache.lookup(key)
    if stale:
        if session_factory is None:
            return None  # the caller asks the database itself
        if _cache.claim_refresh(key):
            threading.Thread(
                target=_refresh, args=(session_factory, key), name="kiln-token-refresh", daemon=True
            ).start()
    if hit and principal is None:
        raise Unauthorized("the token is unknown or revoked")
    return principal


def _refresh(session_factory: Callable[[], Session], key: str) -> None:
    try:
        _look_up(session_factory, key)
    except Exception:  # the database may be down for a moment: the entry then runs out
        logger.warning("looking a token up again failed", exc_info=True)
    finally:
        _cache.refreshed(key)


def _look_up(session_factory: Callable[[], Session], key: str) -> Principal | None:
    """The principal for a token's hash from the database (None: unknown or revoked), cached."""
    with session_factory() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == key))
        principal = None
        if row is not None and row.revoked_at is None:
            principal = Principal(owner=row.owner, scopes=frozenset(row.scopes), token_id=row.id)
            row.last_used_at = now()
            session.commit()
    _cache.put(key, principal)
    return principal


def authenticate(session_factory: Callable[[], Session], token: str) -> Principal:
    """The principal for a Bearer token, or Unauthorized."""
    if not token.startswith(PREFIX):
        raise Unauthorized("the token is not a Kiln token")
    key = hash_token(token)
    hit, principal = _cache.get(key)
    if not hit:
        principal = _look_up(session_factory, key)
    if principal is None:
        raise Unauthorized("the token is unknown or revoked")
    return principal


def bootstrap(session: Session, data_dir: Path) -> str | None:
    """At first start with authentication on: an admin token, written to DATA_DIR/admin-token
    readable only by its owner. Returns the token when one was made."""
    if session.scalar(select(func.count()).select_from(ApiToken)):
        return None
    _, token = create(session, owner="default", name="admin (created at first start)", scopes=["admin"])
    session.commit()
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def read_admin_token(data_dir: Path) -> str | None:
    try:
        return (Path(data_dir) / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def csrf_token(session_token: str) -> str:
    """The CSRF token that goes with a dashboard session: derived from it, never stored."""
    return hashlib.sha256(b"kiln-csrf:" + session_token.encode()).hexdigest()[:32]
