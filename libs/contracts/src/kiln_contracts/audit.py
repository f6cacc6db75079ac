"""The audit trail: who created, started, cancelled or re-ran a job, and who changed keys, members, projects and
third-party event credentials.

The API writes each record to its ``audit_log`` table in the same transaction as the change, then publishes it on
``kiln.audit.<project>.<action>`` (stream ``KILN_AUDIT``; ``_instance`` stands for changes outside any project),
with the record id as ``Nats-Msg-Id``. Records never hold a secret: keys are named by their id (``kiln_3f9a0c21d4``).

Example:
    >>> r = AuditRecorded(id="a1", time=utcnow(), actor="u1", actor_name="ada", credential="kiln_3f9a0c21d4",
    ...                   action=AuditAction.job_started, project="vision", target="job:j-1")
    >>> r.subject
    'kiln.audit.vision.job_started'
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import subjects
from .commands import utcnow

INSTANCE = "_instance"
"""The project token of audit records that concern no project (users, keys)."""


class AuditAction(str, Enum):
    job_created = "job_created"
    job_started = "job_started"
    job_cancelled = "job_cancelled"
    job_rerun = "job_rerun"
    key_created = "key_created"
    key_revoked = "key_revoked"
    member_set = "member_set"
    member_removed = "member_removed"
    user_created = "user_created"
    project_created = "project_created"
    signed_in = "signed_in"
    signed_out = "signed_out"
    event_credentials_created = "event_credentials_created"
    event_credentials_revoked = "event_credentials_revoked"


class AuditRecorded(BaseModel):
    """One audited action (stream KILN_AUDIT)."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = Field(1, description="Schema version.")
    id: str = Field(..., description="Record id; also the Nats-Msg-Id and the audit_log row's id.")
    time: datetime = Field(default_factory=utcnow, description="When the action happened (UTC).")
    actor: str | None = Field(..., description="User id of who did it; null for the instance itself (first start).")
    actor_name: str = Field("", description="That user's name at the time.")
    credential: str = Field("", description="Key id (kiln_...), session:<id> or oidc: how the actor signed in.")
    action: AuditAction = Field(..., description="What was done.")
    project: str | None = Field(None, description="Project concerned; null when none.")
    target: str = Field("", description="What it was done to: job:<id>, key:<id>, user:<id>, project:<id>, "
                        "event-credentials:<id>.")
    details: dict[str, Any] = Field(default_factory=dict, description="Action specifics (e.g. role, reason).")

    @property
    def subject(self) -> str:
        return subjects.audit(self.project or INSTANCE, self.action.value)
