"""The page's OIDC sign-in: authorization code flow with PKCE against the configured issuer.

``/session/oidc`` sends the browser to the issuer with a random ``state`` and a PKCE challenge, remembered in a short
HttpOnly cookie; ``/session/oidc/callback`` checks the state, exchanges the code (with the PKCE verifier) at the
token endpoint, verifies the ID token (signature via JWKS, issuer, audience = client id, expiry, nonce) and maps its
claim to a user exactly as bearer tokens are mapped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt

from .oidc import ALGORITHMS, OIDCError

FLOW_COOKIE = "kiln_oidc_flow"
FLOW_TTL_S = 600


@dataclass
class Flow:
    state: str
    verifier: str
    nonce: str

    @classmethod
    def new(cls) -> Flow:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(48), secrets.token_urlsafe(24))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def cookie(self) -> str:
        return base64.urlsafe_b64encode(json.dumps(self.__dict__).encode()).decode()

    @classmethod
    def from_cookie(cls, value: str | None) -> Flow:
        try:
            return cls(**json.loads(base64.urlsafe_b64decode((value or "").encode())))
        except (ValueError, TypeError):
            raise OIDCError("sign-in expired or was started in another browser: start again") from None


class OIDCLogin:
    def __init__(self, issuer: str, client_id: str, client_secret: str | None, claim: str, leeway_s: int) -> None:
        self.issuer, self.client_id, self.client_secret = issuer, client_id, client_secret
        self.claim, self.leeway_s = claim, leeway_s
        self._meta: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKClient | None = None

    async def metadata(self) -> dict[str, Any]:
        if self._meta is None:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.get(f"{self.issuer.rstrip('/')}/.well-known/openid-configuration")
                r.raise_for_status()
                self._meta = r.json()
            self._jwks = jwt.PyJWKClient(self._meta["jwks_uri"], cache_keys=True, lifespan=300, timeout=5)
        return self._meta

    async def authorization_url(self, flow: Flow, redirect_uri: str) -> str:
        meta = await self.metadata()
        query = {"response_type": "code", "client_id": self.client_id, "redirect_uri": redirect_uri,
                 "scope": "openid", "state": flow.state, "nonce": flow.nonce,
                 "code_challenge": flow.challenge, "code_challenge_method": "S256"}
        return f"{meta['authorization_endpoint']}?{urlencode(query)}"

    async def subject(self, flow: Flow, code: str, state: str, redirect_uri: str) -> str:
        """Exchange ``code`` and return the mapped claim of the verified ID token. Raises :class:`OIDCError`."""
        if not secrets.compare_digest(state, flow.state):
            raise OIDCError("sign-in state does not match: start again")
        meta = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": self.client_id, "code_verifier": flow.verifier}
        if self.client_secret:
            form["client_secret"] = self.client_secret
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(meta["token_endpoint"], data=form)
        if r.status_code != 200:
            raise OIDCError(f"the identity provider refused the code ({r.status_code})")
        id_token = r.json().get("id_token")
        if not isinstance(id_token, str):
            raise OIDCError("the identity provider returned no ID token")
        assert self._jwks is not None
        try:
            key = self._jwks.get_signing_key_from_jwt(id_token)
            claims = jwt.decode(id_token, key.key, algorithms=ALGORITHMS, audience=self.client_id,
                                issuer=self.issuer, leeway=self.leeway_s, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise OIDCError(f"ID token is not valid: {type(exc).__name__}") from None
        if claims.get("nonce") != flow.nonce:
            raise OIDCError("ID token nonce does not match: start again")
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value:
            raise OIDCError(f"ID token has no {self.claim!r} claim")
        return value
