"""Settings of the API (env prefix KILN_API_)."""

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_API_")

    database_url: str = "sqlite+aiosqlite:///var/kiln.db"
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"  # other interfaces only by explicit setting: the API can start code on GPU hosts
    port: int = 8000
    notifier_url: str = "ws://127.0.0.1:8001"  # what the web page uses for live events
    sweep_interval_s: float = 15.0  # republish start commands of queued jobs no runner has acknowledged
    sweep_after_s: float = 30.0
    artifact_s3_endpoint_url: str | None = None  # presigned downloads of s3:// artifacts
