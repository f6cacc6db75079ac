"""Settings of a runner (env prefix KILN_RUNNER_)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, FilePath, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln_contracts import data_roots as paths
from kiln_contracts.natsauth.client import NatsTlsSettings


class Settings(NatsTlsSettings, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_RUNNER_")

    nats_url: str = "nats://127.0.0.1:4222"
    # Its own NATS identity (docs/nats-auth.md); unset: no credentials, and it creates the streams as before.
    nats_creds_file: FilePath | None = Field(None, description="The runner's .creds file (role runner-<pool>).")
    nats_inbox_prefix: str | None = Field(None, description="Inbox prefix its rights allow; default with creds: "
                                          "the role's own (_INBOX.runner-<pool>).")
    streams_wait_s: float = Field(60.0, ge=0, description="With creds: how long to wait for the provisioned "
                                  "streams and buckets before giving up (it may not create them).")
    trainer_signing_seed_file: FilePath | None = Field(
        None, description="Seed of the trainer scoped signing key: each attempt's trainer gets its own creds.")
    nats_account: str | None = Field(None, description="Public key of the KILN account (with the trainer seed).")
    trainer_creds_grace_s: float = Field(
        60.0, ge=0, description="A trainer's creds outlive its attempt's timeout by this much (its last flush).")
    trainer_uid_base: int | None = Field(
        None, ge=1000, description="Run slot i's trainer as uid and gid base+i (the runner must be root): user code "
                                   "then reads neither this runner's secrets nor another attempt's files. Unset: "
                                   "trainers run as the runner's user.")
    pool: str = "default"
    slots: int = Field(1, ge=1, le=64, description="Concurrent trainers (one per GPU on a GPU host).")
    gpus: list[str] = Field(default_factory=list, description="GPU ids, one per slot: CUDA_VISIBLE_DEVICES of each slot.")
    runner_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    work_dir: Path = Path("var/runner")
    trainer_cmd: list[str] = Field(default_factory=lambda: [sys.executable, "-m", "kiln_trainer_ultralytics"])
    heartbeat_s: float = 5.0
    cancel_grace_s: float = 20.0  # after a cancel: time to stop at a batch boundary and checkpoint, then SIGTERM
    kill_grace_s: float = 5.0  # after SIGTERM: then SIGKILL to the whole process group
    cancel_check_s: float = Field(5.0, gt=0, description="How often running jobs' KV cancel marks are read (and at "
                                  "once after a reconnect): a cancel message missed while away still arrives.")
    shutdown_grace_s: float = 30.0
    log_flush_s: float = 0.1
    ack_wait_s: float = 60.0
    dataset_cache: Path | None = None  # default: <work_dir>/datasets
    data_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None, description="Folders a job's local dataset and model files must lie in (symlinks resolved): a JSON "
                          "list or comma-separated. Unset: the work folder; empty: none (s3:// datasets and the "
                          "model YAMLs Ultralytics ships only).")
    s3_endpoint_url: str | None = None  # from the runner's configuration, never from a job
    s3_region: str = "us-east-1"
    s3_allowed_buckets: list[str] = Field(default_factory=list, description="Empty: any bucket the credentials reach.")
    reaper: bool = True  # every runner is a reaper candidate; a KV lease keeps one active
    lost_after_s: float = 25.0  # heartbeat silence before an attempt is retried or marked lost
    reaper_lease_s: float = 10.0
    # Trainer SDK settings passed to every trainer (docs/sdk.md).
    ultralytics_autoload: bool = Field(True, description="Kiln callbacks in any Ultralytics script (PYTHONPATH hook).")
    artifact_dir: Path | None = Field(None, description="KILN_ARTIFACT_DIR: store checkpoints as copies here.")
    artifact_s3_uri: str | None = Field(None, description="KILN_ARTIFACT_S3_URI: s3://bucket/prefix for checkpoints.")
    artifact_s3_endpoint: str | None = Field(None, description="KILN_ARTIFACT_S3_ENDPOINT (S3-compatible stores).")
    trainer_env: dict[str, str] = Field(default_factory=dict, description="Extra trainer environment, given "
                                        "explicitly (e.g. AWS_* credentials for artifact uploads).")
    # Observability (docs/operations.md#metrics-health-and-logs)
    metrics_host: str = Field("127.0.0.1", description="Interface of its /metrics, /livez, /readyz server.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Port of that server; unset: no server "
                                     "(several runners share a host: give each its own); 0: any free port (logged).")
    log_level: str | None = Field(None, description="Python logging level; unset: KILN_LOG_LEVEL, else INFO.")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        return paths.parse_roots(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _trainer_key_and_account(self) -> "Settings":
        if (self.trainer_signing_seed_file is None) != (self.nats_account is None):
            raise ValueError("KILN_RUNNER_TRAINER_SIGNING_SEED_FILE and KILN_RUNNER_NATS_ACCOUNT go together")
        if self.nats_account is not None and not self.nats_account.startswith("A"):
            raise ValueError("KILN_RUNNER_NATS_ACCOUNT is an account public key (it starts with A)")
        return self

    @property
    def roots(self) -> tuple[str, ...]:
        """The data roots with their symlinks resolved (resolved at each use: a root may be created later)."""
        return paths.real_roots([self.work_dir] if self.data_roots is None else self.data_roots)
