"""Third-party event credentials in the database: who made which reader of which project, until when.

Never the ``.creds`` text: only the NATS user's public key, which is what a revocation names.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import utcnow
from kiln_store import event_credentials as ec
from kiln_store import users


def new_id() -> str:
    return "evc_" + uuid.uuid4().hex[:16]


async def create(conn: AsyncConnection, project: str, name: str, public_key: str, created_by: str | None,
                 created_at: datetime, expires_at: datetime) -> dict[str, Any]:
    row = {"id": new_id(), "project_id": project, "name": name, "public_key": public_key, "created_by": created_by,
           "created_at": created_at, "expires_at": expires_at}
    await conn.execute(ec.insert().values(**row))
    return row | {"revoked_at": None}


def _listing() -> Any:
    return (select(ec, users.c.name.label("created_by_name"))
            .select_from(ec.outerjoin(users, users.c.id == ec.c.created_by)))


async def list_for(conn: AsyncConnection, project: str) -> list[dict[str, Any]]:
    """Every credential of the project, newest first, with its creator's name."""
    stmt = _listing().where(ec.c.project_id == project).order_by(ec.c.created_at.desc(), ec.c.id)
    return [dict(r._mapping) for r in (await conn.execute(stmt)).all()]


async def get(conn: AsyncConnection, project: str, cred_id: str) -> dict[str, Any] | None:
    stmt = _listing().where(ec.c.project_id == project, ec.c.id == cred_id)
    r = (await conn.execute(stmt)).first()
    return dict(r._mapping) if r else None


async def active_named(conn: AsyncConnection, project: str, name: str) -> dict[str, Any] | None:
    """The unrevoked, unexpired credential of ``name`` in the project (its durables are in use), if any."""
    stmt = select(ec).where(ec.c.project_id == project, ec.c.name == name, ec.c.revoked_at.is_(None),
                            ec.c.expires_at > utcnow())
    r = (await conn.execute(stmt)).first()
    return dict(r._mapping) if r else None


async def mark_revoked(conn: AsyncConnection, cred_id: str, when: datetime) -> bool:
    res = await conn.execute(update(ec).where(ec.c.id == cred_id, ec.c.revoked_at.is_(None)).values(revoked_at=when))
    return res.rowcount == 1
