"""Authentication: who sent this request (API key, OIDC token or web session), checked on every request.

Nothing is cached between requests: a revoked key, an expired session or a removed membership takes effect on the
next request.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import utcnow

from ..adapters import accounts_repo
from . import keys
from .caller import Caller
from .oidc import OIDCError, OIDCVerifier, looks_like_jwt

log = logging.getLogger("kiln.api.auth")
SESSION_COOKIE = "kiln_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="kiln"'})


class Authenticator:
    """Turns a request's credentials into a :class:`Caller`, or answers 401/403."""

    def __init__(self, oidc: OIDCVerifier | None = None) -> None:
        self.oidc = oidc
        self._touched: dict[str, float] = {}

    async def caller(self, request: Request, conn: AsyncConnection) -> Caller:
        header = request.headers.get("authorization", "").strip()
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized("Authorization must be 'Bearer <API key or token>'")
            return await self._bearer(token.strip(), conn)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            return await self._session(cookie, request, conn)
        raise unauthorized("sign in: send 'Authorization: Bearer <API key>' (or use the web page's sign-in)")

    async def _bearer(self, token: str, conn: AsyncConnection) -> Caller:
        key_id = keys.key_id_of(token)
        if key_id is not None:
            return await self._key(key_id, token, conn)
        if self.oidc is not None and looks_like_jwt(token):
            try:
                subject = await self.oidc.subject(token)
            except OIDCError as exc:
                raise unauthorized(str(exc)) from None
            user = await accounts_repo.user_by_subject(conn, subject)
            if user is None or user["disabled_at"] is not None:
                raise unauthorized("the token is valid but no active Kiln user has its subject")
            return Caller(user["id"], user["name"], user["is_owner"], await accounts_repo.roles_of(conn, user["id"]),
                          credential="oidc", via="oidc")
        raise unauthorized("not a Kiln API key" + (" or an OIDC access token" if self.oidc else ""))

    async def key_caller(self, token: str, conn: AsyncConnection) -> Caller:
        """The caller an API key stands for (the page's sign-in); 401 if it is not a valid, live key."""
        key_id = keys.key_id_of(token.strip())
        if key_id is None:
            raise unauthorized("not a Kiln API key (they look like kiln_0123456789_...)")
        return await self._key(key_id, token.strip(), conn)

    async def _key(self, key_id: str, token: str, conn: AsyncConnection) -> Caller:
        row = await accounts_repo.find_key(conn, key_id)
        if row is None or not keys.matches(token, row["hash"]):
            raise unauthorized("invalid API key")
        now = utcnow()
        if row["revoked_at"] is not None:
            raise unauthorized(f"API key {key_id} was revoked")
        if row["expires_at"] is not None and row["expires_at"] <= now:
            raise unauthorized(f"API key {key_id} expired")
        if row["disabled_at"] is not None:
            raise unauthorized("this user is disabled")
        if time.monotonic() - self._touched.get(key_id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[key_id] = time.monotonic()
            await accounts_repo.touch_key(conn, key_id, now)
            await conn.commit()
        return Caller(row["user_id"], row["user_name"], row["is_owner"], row["roles"], credential=key_id, via="key",
                      key_id=key_id)

    async def _session(self, token: str, request: Request, conn: AsyncConnection) -> Caller:
        row = await accounts_repo.find_session(conn, keys.digest(token))
        now = utcnow()
        if row is None or row["revoked_at"] is not None or row["expires_at"] <= now:
            raise unauthorized("signed out or session expired: sign in again")
        if row["key_revoked_at"] is not None or (row["key_expires_at"] is not None and row["key_expires_at"] <= now):
            raise unauthorized("the API key this session signed in with is no longer valid: sign in again")
        if row["disabled_at"] is not None:
            raise unauthorized("this user is disabled")
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent.encode(), row["csrf"].encode()):
                raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header (the page sends it; "
                                         "scripts should use an API key instead of the cookie)")
        return Caller(row["user_id"], row["user_name"], row["is_owner"],
                      await accounts_repo.roles_of(conn, row["user_id"]), credential=f"session:{row['id']}",
                      via="session", key_id=row["key_id"], session_id=row["id"], csrf=row["csrf"])
