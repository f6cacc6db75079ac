"""The audit trail: a row in the same transaction as the change, then an event on the bus (docs/security.md)."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import AuditAction, AuditRecorded, utcnow
from kiln_store import audit_log

from ..auth.caller import Caller

log = logging.getLogger("kiln.api.audit")


async def record(conn: AsyncConnection, caller: Caller | None, action: AuditAction, *, project: str | None = None,
                 target: str = "", **details: Any) -> AuditRecorded:
    """Write the record (the caller commits it with the change it describes)."""
    rec = AuditRecorded(id=uuid.uuid4().hex, actor=caller.user_id if caller else None,
                        actor_name=caller.name if caller else "", credential=caller.credential if caller else "",
                        action=action, project=project, target=target, details=details)
    await conn.execute(audit_log.insert().values(rec.model_dump(mode="python", exclude={"v"})
                                                 | {"action": action.value}))
    return rec


async def publish(conn: AsyncConnection, bus: Any, *records: AuditRecorded) -> None:
    """Publish committed records; one not published now is published by the sweeper (same id, stored once)."""
    done = []
    for rec in records:
        try:
            await bus.publish_audit(rec)
            done.append(rec.id)
        except Exception as exc:  # noqa: BLE001 - the row is committed; the sweeper publishes it later
            log.warning("audit record %s not published yet: %r", rec.id, exc)
    if done:
        await conn.execute(update(audit_log).where(audit_log.c.id.in_(done)).values(published_at=utcnow()))
        await conn.commit()


async def unpublished(conn: AsyncConnection, limit: int = 500) -> list[AuditRecorded]:
    stmt = select(audit_log).where(audit_log.c.published_at.is_(None)).order_by(audit_log.c.time).limit(limit)
    return [AuditRecorded.model_validate(dict(r._mapping)) for r in (await conn.execute(stmt)).all()]


async def read(conn: AsyncConnection, project: str | None, limit: int, before: datetime | None) -> list[dict[str, Any]]:
    """Newest first; ``project=None`` reads every record (the owner's view)."""
    stmt = select(audit_log).order_by(audit_log.c.time.desc(), audit_log.c.id.desc()).limit(limit)
    if project is not None:
        stmt = stmt.where(audit_log.c.project == project)
    if before is not None:
        stmt = stmt.where(audit_log.c.time < before)
    return [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
