"""Settings of the API (env prefix KILN_API_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kiln_contracts.natsauth.client import NatsTlsSettings
from kiln_contracts.service import is_loopback
from pydantic import DirectoryPath, Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(NatsTlsSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_API_")

    database_url: str = "sqlite+aiosqlite:///var/kiln.db"
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"  # other interfaces only by explicit setting: the API can start code on GPU hosts
    port: int = 8000
    notifier_url: str = "ws://127.0.0.1:8001"  # what the web page uses for live events
    sweep_interval_s: float = 15.0  # republish start commands of queued jobs no runner has acknowledged
    sweep_after_s: float = 30.0
    artifact_s3_endpoint_url: str | None = None  # presigned downloads of s3:// artifacts

    # -- authentication (docs/security.md) --
    auth: Literal["on", "off"] = Field(
        "on", description="off: every caller is the owner; only for benchmarks, and refused beyond loopback.")
    bootstrap_key: SecretStr | None = Field(
        None, description="The owner's first API key (kiln_...), used once when no owner exists yet.")
    bootstrap_key_file: Path | None = Field(
        None, description="On first start, generate the owner's key and write it here (mode 0600).")
    session_ttl_s: int = Field(12 * 3600, ge=60, description="Life of a web page sign-in.")
    cookie_secure: bool = Field(True, description="Secure flag of the session cookie (browsers allow it on "
                                                  "http://localhost and 127.0.0.1 too).")
    ticket_private_key_file: Path | None = Field(
        None, description="Ed25519 private key (PEM) that signs WebSocket tickets; the notifier holds its public key.")
    oidc_issuer: str | None = Field(None, description="Accept JWT access tokens from this issuer (iss).")
    oidc_audience: str | None = Field(None, description="Required audience (aud) of OIDC tokens.")
    oidc_jwks_url: str | None = Field(None, description="JWKS URL; default: the issuer's discovery document's.")
    oidc_user_claim: str = Field("sub", description="Claim matched against a user's oidc_subject.")
    oidc_leeway_s: int = Field(30, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    oidc_client_id: str | None = Field(None, description="The page's OIDC client id: enables 'Sign in with OIDC' "
                                                         "(authorization code flow with PKCE).")
    oidc_client_secret: SecretStr | None = Field(None, description="Client secret, for a confidential client.")
    public_url: str | None = Field(None, description="The URL users reach the API at (https://kiln.example.com), "
                                                     "for the OIDC redirect; default: the request's own.")
    # -- NATS identities (docs/nats-auth.md); unset: connect without credentials and create the streams, as before --
    nats_creds_file: FilePath | None = Field(
        None, description="The API's own NATS creds (<trust>/creds/api.creds). With them the API only checks that "
                          "its streams exist: the provisioning step creates them.")
    nats_inbox_prefix: str | None = Field(
        None, description="Inbox prefix the API's creds allow (default with creds: _INBOX.api).")
    streams_wait_s: float = Field(
        60.0, ge=0, description="With creds: how long to wait at start for the provisioned streams before giving up.")
    nats_trust_dir: DirectoryPath | None = Field(
        None, description="The NATS trust directory `kiln up` keeps (<data dir>/nats/trust): trust.json holds the "
                          "revocation list; keys/operator-signing.nk and creds/sys.creds push revocations. Enables "
                          "third-party event credentials, with the two settings below defaulting from it.")
    nats_third_party_seed_file: FilePath | None = Field(
        None, description="Seed of the third-party scoped signing key (default: <trust dir>/keys/third-party.nk).")
    nats_account: str | None = Field(
        None, description="Public key of the KILN account (default: the one in <trust dir>/trust.json).")
    nats_public_url: str | None = Field(
        None, description="NATS URL(s), comma-separated, that third-party subscribers connect to (default: "
                          "nats_url).")
    # -- limits --
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body; larger ones answer 413.")
    create_rate_limit: str = Field(
        "60/minute", description="Job creations (create, re-run) per API key or session, `limits` notation.")
    rate_limit_storage: str = Field(
        "memory://", description="Where rate limits are counted (memory://, or redis://... shared by replicas).")
    log_level: str | None = Field(None, description="Python logging level; unset: KILN_LOG_LEVEL, else INFO.")

    @model_validator(mode="after")
    def _no_open_api_beyond_loopback(self) -> Settings:
        if self.auth == "off" and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on {self.host} without authentication (auth=off); "
                             "only loopback addresses may run without it")
        return self

    @model_validator(mode="after")
    def _third_party_needs_the_whole_chain(self) -> Settings:
        given = {"nats_third_party_seed_file": self.nats_third_party_seed_file, "nats_account": self.nats_account}
        if any(given.values()) and self.nats_trust_dir is None:
            raise ValueError("third-party event credentials need nats_trust_dir too (revocation re-signs the "
                             "account in that directory)")
        if self.nats_trust_dir is not None and self.nats_creds_file is None:
            raise ValueError("nats_trust_dir needs nats_creds_file: event credentials work only on a NATS server "
                             "with JWT auth, where the API needs its own creds")
        return self

    @property
    def nats_public_urls(self) -> list[str]:
        return [u.strip() for u in (self.nats_public_url or self.nats_url).split(",") if u.strip()]
