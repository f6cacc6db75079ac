"""Settings of the metrics-writer (env prefix KILN_WRITER_)."""

from pydantic import Field, FilePath
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln_contracts.natsauth.client import NatsTlsSettings


class Settings(NatsTlsSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_WRITER_")

    nats_url: str = "nats://127.0.0.1:4222"
    # Its own NATS identity (docs/nats-auth.md); unset: no credentials, and it creates the streams as before.
    nats_creds_file: FilePath | None = Field(None, description="The writer's .creds file (role metrics-writer).")
    nats_inbox_prefix: str | None = Field(None, description="Inbox prefix its rights allow; default with creds: "
                                          "the role's own (_INBOX.<durable>).")
    streams_wait_s: float = Field(60.0, ge=0, description="With creds: how long to wait for the provisioned "
                                  "streams before giving up (it may not create them).")
    database_url: str = "sqlite+aiosqlite:///var/kiln.db"
    durable: str = "metrics-writer"
    batch_size: int = 5000
    batch_ms: int = 50
    max_backoff_s: float = 10.0
    # How long JetStream waits for an ack before redelivering (e.g. after a crash); None: the durable's own
    # (kiln_contracts.streams.writer_consumers, 5 s).
    ack_wait_s: float | None = None
    lanes: int = 2  # batches written at once per durable (each in its own transaction, acked after its commit)
    # Observability (docs/operations.md#metrics-health-and-logs)
    metrics_host: str = Field("127.0.0.1", description="Interface of its /metrics, /livez, /readyz server.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Port of that server; unset: no server "
                                     "(the metrics are still kept); 0: any free port (logged).")
    log_level: str | None = Field(None, description="Python logging level; unset: KILN_LOG_LEVEL, else INFO.")
