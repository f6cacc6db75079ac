"""Settings of the metrics-writer (env prefix KILN_WRITER_)."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_WRITER_")

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "sqlite+aiosqlite:///var/kiln.db"
    durable: str = "metrics-writer"
    batch_size: int = 5000
    batch_ms: int = 50
    max_backoff_s: float = 10.0
    # How long JetStream waits for an ack before redelivering (e.g. after a crash); None: the durable's own
    # (kiln_contracts.streams.writer_consumers, 5 s).
    ack_wait_s: float | None = None
    lanes: int = 2  # batches written at once per durable (each in its own transaction, acked after its commit)
