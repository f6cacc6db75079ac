"""An OpenID provider on a loopback port for tests (no outside identity provider): discovery, an authorize endpoint
that approves at once as ``subject``, a token endpoint that checks the PKCE verifier, and the JWKS."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import jwt


class IdentityProvider:
    def __init__(self, subject: str = "ada@example") -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.subject = subject
        self.codes: dict[str, dict[str, str]] = {}  # code -> the authorization request that got it
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def id_token(self, request: dict[str, str]) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": request["client_id"], "sub": self.subject, "iat": now, "exp": now + 300,
                  "nonce": request["nonce"]}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: Any = None, location: str | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/.well-known/openid-configuration":
                    self._send(200, {"issuer": idp.issuer, "authorization_endpoint": f"{idp.issuer}/authorize",
                                     "token_endpoint": f"{idp.issuer}/token", "jwks_uri": f"{idp.issuer}/jwks"})
                elif url.path == "/jwks":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp.key.public_key()))
                    self._send(200, {"keys": [jwk | {"kid": "k1", "use": "sig", "alg": "RS256"}]})
                elif url.path == "/authorize":
                    code = f"code-{len(idp.codes)}-{time.monotonic_ns()}"
                    idp.codes[code] = q
                    self._send(302, location=q["redirect_uri"] + "?" + urlencode({"code": code, "state": q["state"]}))
                else:
                    self._send(404, {})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                form = {k: v[0] for k, v in parse_qs(body).items()}
                asked = idp.codes.pop(form.get("code", ""), None)  # a code is good once
                verifier = form.get("code_verifier", "").encode()
                challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
                if asked is None or challenge != asked.get("code_challenge"):
                    self._send(400, {"error": "invalid_grant"})
                    return
                self._send(200, {"id_token": idp.id_token(asked), "token_type": "Bearer", "access_token": "opaque"})

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
