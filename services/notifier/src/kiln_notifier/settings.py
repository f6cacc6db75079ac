"""Notifier settings, read from ``KILN_NOTIFIER_*`` environment variables (built once, in ``main.py``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class NotifierSettings(BaseSettings):
    """Configuration of one notifier process.

    Example:
        >>> NotifierSettings(allowed_origins="https://kiln.example, http://localhost:5173").allowed_origins
        ['https://kiln.example', 'http://localhost:5173']
    """

    model_config = SettingsConfigDict(env_prefix="KILN_NOTIFIER_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server URL(s), comma separated.")
    host: str = Field("127.0.0.1", description="Listen address; loopback unless another one is set explicitly.")
    port: int = Field(8001, ge=1, le=65535, description="Listen port.")
    client_queue: int = Field(
        1000, ge=1, description="Messages buffered per WebSocket client; beyond it the client is closed with 1013."
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to open WebSockets (comma separated or a JSON list); empty: no Origin check.",
    )
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
    log_level: str = Field("INFO", description="Python logging level.")

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
