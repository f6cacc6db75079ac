"""Settings of the ClearML forwarder (env prefix KILN_CLEARML_)."""

from pathlib import Path

from pydantic import Field, FilePath
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln_contracts import streams
from kiln_contracts.natsauth.client import NatsTlsSettings


class Settings(NatsTlsSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_CLEARML_")

    enabled: bool = Field(default=False, description="Run the forwarder at all (it is optional).")
    nats_url: str = "nats://127.0.0.1:4222"
    # Its own NATS identity (docs/nats-auth.md); unset: no credentials, and it creates the streams as before.
    nats_creds_file: FilePath | None = Field(default=None, description="Its .creds file (role clearml-forwarder).")
    nats_inbox_prefix: str | None = Field(default=None, description="Inbox prefix its rights allow; default with "
                                          "creds: the role's own (_INBOX.<durable>).")
    streams_wait_s: float = Field(default=60.0, ge=0, description="With creds: how long to wait for the "
                                  "provisioned streams and task map bucket (it may not create them).")
    durable: str = Field(default="clearml-forwarder", description="Prefix of its two durables (-events, -logs).")
    task_map_bucket: str = Field(default=streams.CLEARML_TASKS_BUCKET, description="NATS KV bucket: job id -> task id.")
    config_file: Path | None = Field(
        default=None,
        description="clearml.conf (server, credentials); default: CLEARML_CONFIG_FILE, else ~/clearml.conf.",
    )
    offline: bool = Field(default=False, description="ClearML offline mode: sessions on local disk, no server.")
    cache_dir: Path | None = Field(default=None, description="CLEARML_CACHE_DIR (offline: <cache_dir>/offline).")
    output_uri: str | None = Field(default=None, description="Where model/artifact files go (default: files server).")
    project_prefix: str = Field(default="", description="Prepended to the Kiln project to name the ClearML project.")
    tags: list[str] = Field(default_factory=lambda: ["kiln"], description="Tags on every task.")
    fetch_batch: int = 256
    fetch_ms: int = 200
    workers: int = Field(default=4, description="Threads for ClearML calls (jobs report in parallel up to this).")
    call_timeout_s: float = Field(default=30.0, description="HTTP read timeout of one ClearML request.")
    backoff_initial_s: float = 0.5
    max_backoff_s: float = 30.0
    keepalive_s: float = Field(default=15.0, description="In-progress acks while messages wait (ack wait is 60 s).")
    linger_s: float = Field(default=30.0, description="A finished job's task stays open this long for late logs.")
    idle_s: float = Field(default=600.0, description="An unfinished job's task is released after this long idle.")
    forget_s: float = Field(default=3600.0, description="A released job's seen event ids are kept this long.")
    # Observability (docs/operations.md#metrics-health-and-logs)
    metrics_host: str = Field(default="127.0.0.1", description="Interface of its /metrics, /livez, /readyz server.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Port of that server; unset: no "
                                     "server; 0: any free port (logged).")
    log_level: str | None = Field(default=None, description="Python logging level; unset: KILN_LOG_LEVEL, else "
                                  "INFO.")
