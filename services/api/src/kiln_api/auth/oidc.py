"""OIDC access tokens: JWTs from one configured issuer, checked against its JWKS (PyJWT's ``PyJWKClient``)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]


class OIDCError(ValueError):
    """A token that is not acceptable (message fit for the caller; never the token)."""


@dataclass
class OIDCVerifier:
    issuer: str
    audience: str | None
    jwks_url: str | None
    claim: str = "sub"
    leeway_s: int = 30

    def __post_init__(self) -> None:
        self._client: jwt.PyJWKClient | None = None

    def _jwks_client(self) -> jwt.PyJWKClient:
        if self._client is None:
            url = self.jwks_url or _discover_jwks(self.issuer)
            self._client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)
        return self._client

    def subject_sync(self, token: str) -> str:
        """The mapped claim of a valid token. Raises :class:`OIDCError`."""
        try:
            key = self._jwks_client().get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=ALGORITHMS, audience=self.audience, issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss"] + (["aud"] if self.audience else []),
                         "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise OIDCError("token expired") from None
        except jwt.PyJWKClientError as exc:
            raise OIDCError(f"token signing key not found at the issuer ({type(exc).__name__})") from None
        except jwt.InvalidTokenError as exc:
            raise OIDCError(f"token is not valid: {type(exc).__name__}") from None
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value:
            raise OIDCError(f"token has no {self.claim!r} claim")
        return value

    async def subject(self, token: str) -> str:
        """:meth:`subject_sync` off the event loop (a JWKS fetch is blocking I/O)."""
        return await asyncio.to_thread(self.subject_sync, token)


def _discover_jwks(issuer: str) -> str:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the operator's configured issuer
        return str(json.load(resp)["jwks_uri"])


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")
