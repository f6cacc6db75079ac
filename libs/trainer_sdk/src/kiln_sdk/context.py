"""The job context a Kiln runner hands to a trainer through its environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kiln_contracts import StartJob
from kiln_contracts.natsauth.client import NatsTls


@dataclass(frozen=True)
class JobContext:
    """Where a run belongs and where it may write, as read from ``KILN_*`` variables.

    Attributes:
        job_id: ``KILN_JOB_ID``; ``None`` outside Kiln (standalone mode).
        project: ``KILN_PROJECT`` (default ``"default"``).
        attempt: ``KILN_ATTEMPT`` (default 1).
        nats_url: ``KILN_NATS_URL``; ``None`` means every event is spooled for the runner to replay.
        nats_creds: ``KILN_NATS_CREDS``: this attempt's NATS credentials file (the runner mints it; mode 0600).
        nats_inbox_prefix: ``KILN_NATS_INBOX_PREFIX``: the inbox prefix those credentials may receive acks under.
        nats_tls: ``KILN_NATS_TLS_CA_FILE`` / ``_CERT_FILE`` / ``_KEY_FILE``: the runner's NATS TLS files.
        job_dir: ``KILN_JOB_DIR``, the writable folder of this attempt (default: the current folder).
        spec_path: ``KILN_JOB_SPEC``, a JSON file holding the :class:`kiln_contracts.StartJob`.
        dataset: ``KILN_DATASET``, the resolved local dataset path.
        spool_dir: ``KILN_SPOOL_DIR`` (default ``$KILN_JOB_DIR/spool``).
        resume: ``KILN_RESUME``, a checkpoint to resume from.
        sdk_file: ``KILN_SDK_FILE``: outside Kiln, write events as JSON lines to this file.
        artifact_dir: ``KILN_ARTIFACT_DIR``: store artifacts as copies in this folder.
        artifact_s3_uri: ``KILN_ARTIFACT_S3_URI`` (``s3://bucket/prefix``): store artifacts in this bucket.
        artifact_s3_endpoint: ``KILN_ARTIFACT_S3_ENDPOINT``: S3 endpoint URL (S3-compatible stores).
        artifact_s3_region: ``KILN_ARTIFACT_S3_REGION`` (default ``us-east-1``).
        system_metrics_s: ``KILN_SYSTEM_METRICS_S``: seconds between two samples of CPU, RAM and GPU use
            (``sys/*`` metrics); default 5 inside Kiln, 0 (off) outside.

    Example:
        >>> ctx = JobContext.from_env({"KILN_JOB_ID": "j1", "KILN_ATTEMPT": "2", "KILN_JOB_DIR": "/tmp/j1"})
        >>> (ctx.job_id, ctx.attempt, str(ctx.spool_dir))
        ('j1', 2, '/tmp/j1/spool')
    """

    job_id: str | None = None
    project: str = "default"
    attempt: int = 1
    nats_url: str | None = None
    nats_creds: Path | None = None
    nats_inbox_prefix: str | None = None
    nats_tls: NatsTls = field(default_factory=NatsTls)
    job_dir: Path = Path(".")
    spec_path: Path | None = None
    dataset: str | None = None
    spool_dir: Path = Path("spool")
    resume: str | None = None
    sdk_file: Path | None = None
    artifact_dir: Path | None = None
    artifact_s3_uri: str | None = None
    artifact_s3_endpoint: str | None = None
    artifact_s3_region: str | None = None
    system_metrics_s: float = 0.0

    @property
    def in_kiln(self) -> bool:
        """Whether a Kiln runner started this process (``KILN_JOB_ID`` is set)."""
        return bool(self.job_id)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "JobContext":
        """Read the context from ``env`` (default ``os.environ``); never raises on bad values."""
        env = os.environ if env is None else env
        job_dir = Path(env.get("KILN_JOB_DIR") or ".")
        try:
            attempt = max(1, int(env.get("KILN_ATTEMPT") or 1))
        except ValueError:
            # A bad attempt number must not stop training; the runner knows the real one anyway.
            print(f"kiln_sdk: KILN_ATTEMPT={env.get('KILN_ATTEMPT')!r} is not an int, using 1", file=sys.stderr)
            attempt = 1
        spec = env.get("KILN_JOB_SPEC")
        sdk_file = env.get("KILN_SDK_FILE")
        artifact_dir = env.get("KILN_ARTIFACT_DIR")
        job_id = env.get("KILN_JOB_ID") or None
        creds = env.get("KILN_NATS_CREDS")
        try:
            tls = NatsTls.from_env(env)
        except ValueError as exc:  # a certificate without its key: connect without it (the server may refuse)
            print(f"kiln_sdk: {exc}", file=sys.stderr)
            tls = NatsTls(NatsTls.from_env({k: v for k, v in env.items() if k.endswith("_CA_FILE")}).ca_file)
        try:
            system_s = max(0.0, float(env.get("KILN_SYSTEM_METRICS_S") or (5.0 if job_id else 0.0)))
        except ValueError:
            system_s = 5.0 if job_id else 0.0
        return cls(
            job_id=job_id,
            project=env.get("KILN_PROJECT") or "default",
            attempt=attempt,
            nats_url=env.get("KILN_NATS_URL") or None,
            nats_creds=Path(creds) if creds else None,
            nats_inbox_prefix=env.get("KILN_NATS_INBOX_PREFIX") or None,
            nats_tls=tls,
            job_dir=job_dir,
            spec_path=Path(spec) if spec else None,
            dataset=env.get("KILN_DATASET") or None,
            spool_dir=Path(env.get("KILN_SPOOL_DIR") or job_dir / "spool"),
            resume=env.get("KILN_RESUME") or None,
            sdk_file=Path(sdk_file) if sdk_file else None,
            artifact_dir=Path(artifact_dir) if artifact_dir else None,
            artifact_s3_uri=env.get("KILN_ARTIFACT_S3_URI") or None,
            artifact_s3_endpoint=env.get("KILN_ARTIFACT_S3_ENDPOINT") or None,
            artifact_s3_region=env.get("KILN_ARTIFACT_S3_REGION") or None,
            system_metrics_s=system_s,
        )

    def load_spec(self) -> StartJob | None:
        """Parse the StartJob of ``KILN_JOB_SPEC``; ``None`` when no spec file was given.

        Raises:
            OSError: the file cannot be read.
            pydantic.ValidationError: the file is not a valid StartJob.
        """
        if self.spec_path is None:
            return None
        return StartJob.model_validate_json(self.spec_path.read_bytes())

    @property
    def cancel_file(self) -> Path:
        """File whose existence asks the trainer to stop (the runner creates it on cancel)."""
        return self.job_dir / "cancel"
