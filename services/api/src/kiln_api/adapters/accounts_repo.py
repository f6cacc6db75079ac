"""Users, projects, memberships, API keys and web sessions (the API is these tables' only writer)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import utcnow
from kiln_store import DEFAULT_PROJECT, api_keys, memberships, projects, sessions, users

from ..auth.keys import NewKey, new_api_key, new_token
from ..auth.roles import Role

OWNER_NAME = "owner"


def _row(r: Any) -> dict[str, Any]:
    return dict(r._mapping)


def new_id() -> str:
    return uuid.uuid4().hex[:16]


# -- users ----------------------------------------------------------------------------------------------------------

async def create_user(conn: AsyncConnection, name: str, *, is_owner: bool = False,
                      oidc_subject: str | None = None) -> dict[str, Any]:
    row = {"id": new_id(), "name": name, "is_owner": is_owner, "oidc_subject": oidc_subject, "created_at": utcnow()}
    await conn.execute(users.insert().values(**row))
    return row | {"disabled_at": None}


async def get_user(conn: AsyncConnection, user_id: str) -> dict[str, Any] | None:
    r = (await conn.execute(select(users).where(users.c.id == user_id))).first()
    return _row(r) if r else None


async def user_by_subject(conn: AsyncConnection, subject: str) -> dict[str, Any] | None:
    r = (await conn.execute(select(users).where(users.c.oidc_subject == subject))).first()
    return _row(r) if r else None


async def list_users(conn: AsyncConnection) -> list[dict[str, Any]]:
    return [_row(r) for r in (await conn.execute(select(users).order_by(users.c.created_at))).all()]


async def owner_exists(conn: AsyncConnection) -> bool:
    return (await conn.execute(select(func.count()).select_from(users).where(users.c.is_owner))).scalar_one() > 0


async def roles_of(conn: AsyncConnection, user_id: str) -> dict[str, Role]:
    rows = await conn.execute(select(memberships.c.project_id, memberships.c.role)
                              .where(memberships.c.user_id == user_id))
    return {p: Role(r) for p, r in rows.all()}


# -- projects and memberships ---------------------------------------------------------------------------------------

async def create_project(conn: AsyncConnection, project_id: str, description: str, created_by: str | None) -> None:
    await conn.execute(projects.insert().values(id=project_id, description=description, created_at=utcnow(),
                                                created_by=created_by))


async def get_project(conn: AsyncConnection, project_id: str) -> dict[str, Any] | None:
    r = (await conn.execute(select(projects).where(projects.c.id == project_id))).first()
    return _row(r) if r else None


async def list_projects(conn: AsyncConnection, only: list[str] | None) -> list[dict[str, Any]]:
    stmt = select(projects).order_by(projects.c.id)
    if only is not None:
        stmt = stmt.where(projects.c.id.in_(only))
    return [_row(r) for r in (await conn.execute(stmt)).all()]


async def members(conn: AsyncConnection, project_id: str) -> list[dict[str, Any]]:
    stmt = (select(memberships.c.user_id, users.c.name, memberships.c.role, memberships.c.created_at)
            .select_from(memberships.join(users, users.c.id == memberships.c.user_id))
            .where(memberships.c.project_id == project_id).order_by(users.c.name))
    return [_row(r) for r in (await conn.execute(stmt)).all()]


async def set_member(conn: AsyncConnection, project_id: str, user_id: str, role: Role) -> str | None:
    """Give ``user_id`` ``role`` in the project; returns the previous role (None: newly added)."""
    old = (await conn.execute(select(memberships.c.role).where(
        memberships.c.project_id == project_id, memberships.c.user_id == user_id))).scalar_one_or_none()
    if old is None:
        await conn.execute(memberships.insert().values(project_id=project_id, user_id=user_id, role=role.value,
                                                       created_at=utcnow()))
    else:
        await conn.execute(update(memberships).where(memberships.c.project_id == project_id,
                                                     memberships.c.user_id == user_id).values(role=role.value))
    return old


async def remove_member(conn: AsyncConnection, project_id: str, user_id: str) -> bool:
    res = await conn.execute(delete(memberships).where(memberships.c.project_id == project_id,
                                                       memberships.c.user_id == user_id))
    return res.rowcount == 1


async def share_a_project_as_admin(conn: AsyncConnection, admin_id: str, user_id: str) -> bool:
    """Whether ``admin_id`` is an admin of a project that ``user_id`` belongs to."""
    mine = select(memberships.c.project_id).where(memberships.c.user_id == admin_id,
                                                  memberships.c.role == Role.admin.value)
    stmt = select(func.count()).select_from(memberships).where(memberships.c.user_id == user_id,
                                                               memberships.c.project_id.in_(mine))
    return (await conn.execute(stmt)).scalar_one() > 0


# -- API keys -------------------------------------------------------------------------------------------------------

async def create_key(conn: AsyncConnection, user_id: str, name: str, expires_at: datetime | None,
                     created_by: str | None, key: NewKey | None = None) -> tuple[NewKey, dict[str, Any]]:
    key = key or new_api_key()
    row = {"id": key.id, "user_id": user_id, "name": name, "hash": key.hash, "created_at": utcnow(),
           "created_by": created_by, "expires_at": expires_at}
    await conn.execute(api_keys.insert().values(**row))
    return key, row | {"revoked_at": None, "last_used_at": None}


async def find_key(conn: AsyncConnection, key_id: str) -> dict[str, Any] | None:
    """A key with its user's name, flags and roles (``roles``: project -> Role), in one query, for authentication."""
    stmt = (select(api_keys, users.c.name.label("user_name"), users.c.is_owner, users.c.disabled_at,
                   memberships.c.project_id, memberships.c.role)
            .select_from(api_keys.join(users, users.c.id == api_keys.c.user_id)
                         .outerjoin(memberships, memberships.c.user_id == api_keys.c.user_id))
            .where(api_keys.c.id == key_id))
    rows = (await conn.execute(stmt)).all()
    if not rows:
        return None
    out = _row(rows[0])
    out["roles"] = {r.project_id: Role(r.role) for r in rows if r.project_id is not None}
    return out


async def list_keys(conn: AsyncConnection, user_id: str) -> list[dict[str, Any]]:
    stmt = select(api_keys).where(api_keys.c.user_id == user_id).order_by(api_keys.c.created_at)
    return [_row(r) for r in (await conn.execute(stmt)).all()]


async def revoke_key(conn: AsyncConnection, user_id: str, key_id: str) -> bool:
    res = await conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.user_id == user_id,
                                                    api_keys.c.revoked_at.is_(None)).values(revoked_at=utcnow()))
    return res.rowcount == 1


async def touch_key(conn: AsyncConnection, key_id: str, when: datetime) -> None:
    await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=when))


# -- web sessions ---------------------------------------------------------------------------------------------------

async def create_session(conn: AsyncConnection, user_id: str, key_id: str | None, token_hash: str,
                         ttl: timedelta) -> dict[str, Any]:
    now = utcnow()
    row = {"id": new_id(), "token_hash": token_hash, "user_id": user_id, "key_id": key_id, "csrf": new_token(),
           "created_at": now, "expires_at": now + ttl}
    await conn.execute(sessions.insert().values(**row))
    return row


async def find_session(conn: AsyncConnection, token_hash: str) -> dict[str, Any] | None:
    """A session with its user's flags and, when it was opened with an API key, that key's state."""
    key = api_keys.alias("k")
    stmt = (select(sessions, users.c.name.label("user_name"), users.c.is_owner, users.c.disabled_at,
                   key.c.revoked_at.label("key_revoked_at"), key.c.expires_at.label("key_expires_at"))
            .select_from(sessions.join(users, users.c.id == sessions.c.user_id)
                         .outerjoin(key, key.c.id == sessions.c.key_id))
            .where(sessions.c.token_hash == token_hash))
    r = (await conn.execute(stmt)).first()
    return _row(r) if r else None


async def session_expiry(conn: AsyncConnection, session_id: str) -> datetime | None:
    return (await conn.execute(select(sessions.c.expires_at).where(sessions.c.id == session_id))).scalar()


async def revoke_session(conn: AsyncConnection, session_id: str) -> None:
    await conn.execute(update(sessions).where(sessions.c.id == session_id).values(revoked_at=utcnow()))


async def purge_sessions(conn: AsyncConnection, older_than: timedelta = timedelta(days=1)) -> int:
    """Forget sessions that ended (expired or signed out) more than ``older_than`` ago."""
    cutoff = utcnow() - older_than
    res = await conn.execute(delete(sessions).where(
        (sessions.c.expires_at < cutoff) | (sessions.c.revoked_at < cutoff)))
    return res.rowcount or 0


# -- first start ----------------------------------------------------------------------------------------------------

async def bootstrap_owner(conn: AsyncConnection, key: NewKey) -> dict[str, Any] | None:
    """Create the instance owner with ``key`` unless an owner exists; returns the new owner, else None."""
    if await owner_exists(conn):
        return None
    owner = await create_user(conn, OWNER_NAME, is_owner=True)
    await create_key(conn, owner["id"], "created on first start", None, None, key=key)
    if await get_project(conn, DEFAULT_PROJECT) is None:
        await create_project(conn, DEFAULT_PROJECT, "", owner["id"])
    return owner
