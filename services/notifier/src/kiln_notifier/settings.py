"""Notifier settings, read from ``KILN_NOTIFIER_*`` environment variables (built once, in ``main.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from kiln_contracts.natsauth.client import NatsTlsSettings
from kiln_contracts.service import is_loopback
from kiln_contracts.tickets import SOCKET_RECHECK_S
from pydantic import Field, FilePath, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .auth import load_public_key


class NotifierSettings(NatsTlsSettings, BaseSettings):
    """Configuration of one notifier process.

    With ``auth="tickets"`` (the default) it refuses to be built without a readable Ed25519 public key file;
    ``auth="off"`` (benchmarks only) is refused on any host but a loopback one.

    Example:
        >>> NotifierSettings(auth="off", allowed_origins="https://kiln.example, http://localhost:5173").allowed_origins
        ['https://kiln.example', 'http://localhost:5173']
        >>> NotifierSettings(auth="off", host="0.0.0.0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for NotifierSettings
          Value error, KILN_NOTIFIER_AUTH=off is allowed on a loopback host only, not 0.0.0.0 ...
    """

    model_config = SettingsConfigDict(env_prefix="KILN_NOTIFIER_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    nats_creds_file: FilePath | None = Field(
        None, description="Its own NATS identity, a .creds file (role notifier; docs/nats-auth.md); unset: no "
                          "credentials, and it creates the streams as before.")
    nats_inbox_prefix: str | None = Field(
        None, description="Inbox prefix its rights allow; default with creds: the role's own (_INBOX.notifier).")
    streams_wait_s: float = Field(
        60.0, ge=0, description="With creds: how long to wait for the provisioned streams (it may not create them).")
    host: str = Field("127.0.0.1", description="Listen address; loopback unless another one is set explicitly.")
    port: int = Field(8001, ge=1, le=65535, description="Listen port.")
    client_queue: int = Field(
        1000, ge=1, description="Messages buffered per WebSocket client; beyond it the client is closed with 1013."
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed to open WebSockets (comma separated or a JSON list); empty: none with "
                    "auth on, no Origin check with auth off.",
    )
    auth: Literal["tickets", "off"] = Field(
        "tickets", description="'tickets': every socket needs a ticket signed by the API; 'off': loopback benchmarks.")
    ticket_public_key_file: Path | None = Field(
        None, description="The API's Ed25519 public key (PEM) that checks tickets; required with auth 'tickets'.")
    recheck_s: float = Field(
        SOCKET_RECHECK_S, gt=0, le=SOCKET_RECHECK_S,
        description="A socket stays authorised this long after its ticket was issued, unless renewed.")
    auth_timeout_s: float = Field(
        5.0, gt=0, description="How long a socket without a ticket in its handshake gets to send it as first frame.")
    max_subscriptions: int = Field(100, ge=1, description="Subscriptions one multi-job WebSocket may hold.")
    close_timeout_s: float = Field(
        5.0, gt=0, description="How long a slow client gets to take the overflow notice and close frame."
    )
    shutdown_timeout_s: float = Field(
        10.0, gt=0, description="On shutdown, how long open WebSockets get to close before they are dropped."
    )
    consumer_idle_heartbeat_s: float = Field(
        5.0, gt=0, description="Idle heartbeat of the ordered consumers; a stalled consumer is recreated after 2."
    )
    log_level: str | None = Field(None, description="Python logging level; unset: KILN_LOG_LEVEL, else INFO.")

    _public_key: bytes | None = PrivateAttr(None)

    @property
    def public_key(self) -> bytes | None:
        """The ticket public key (PEM), read once when the settings were built; ``None`` with auth off."""
        return self._public_key

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        # Env vars are strings: accept a JSON list or the friendlier comma separated form.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _auth_is_configured(self) -> NotifierSettings:
        if self.auth == "off":
            if not is_loopback(self.host):
                raise ValueError(f"KILN_NOTIFIER_AUTH=off is allowed on a loopback host only, not {self.host} "
                                 "(without tickets anyone who reaches the port can watch any job)")
            return self
        if self.ticket_public_key_file is None:
            raise ValueError("KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE is required with KILN_NOTIFIER_AUTH=tickets: "
                             "the path of the API's Ed25519 public key (PEM) that checks WebSocket tickets")
        self._public_key = load_public_key(self.ticket_public_key_file)
        return self
