"""Users, API keys, projects, memberships and the audit trail (who may call what: ``auth.access``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from sqlalchemy.exc import IntegrityError

from kiln_contracts import AuditAction, utcnow

from ..adapters import accounts_repo, audit
from ..auth.access import CallerDep, access
from ..auth.roles import Role
from ..deps import BusDep, ConnDep
from ..schemas import (
    AuditOut, KeyCreate, KeyCreated, KeyOut, MemberOut, MemberSet, MeOut, ProjectCreate, ProjectOut, UserCreate,
    UserOut,
)

router = APIRouter(tags=["accounts"])
AuditLimit = Annotated[int, Query(ge=1, le=1000)]
Before = Annotated[datetime | None, Query(description="Only records older than this (paging).")]


@router.get("/me", response_model=MeOut, **access("user"))
async def me(caller: CallerDep) -> dict[str, Any]:
    """Who the request's credentials belong to, and their role in each project."""
    return caller.public()


@router.get("/users", response_model=list[UserOut], **access("owner"))
async def list_users(conn: ConnDep) -> list[dict[str, Any]]:
    return await accounts_repo.list_users(conn)


@router.post("/users", status_code=201, response_model=UserOut, **access("owner"))
async def create_user(body: UserCreate, conn: ConnDep, bus: BusDep, caller: CallerDep) -> dict[str, Any]:
    """Create a user (no access until made a member of a project, or given ``is_owner``)."""
    try:
        user = await accounts_repo.create_user(conn, body.name, is_owner=body.is_owner, oidc_subject=body.oidc_subject)
    except IntegrityError:
        raise HTTPException(409, f"a user named {body.name!r} or with that OIDC subject exists") from None
    rec = await audit.record(conn, caller, AuditAction.user_created, target=f"user:{user['id']}",
                             name=body.name, is_owner=body.is_owner)
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return user


@router.get("/users/{user_id}/keys", response_model=list[KeyOut], **access("user_admin"))
async def list_keys(user_id: str, conn: ConnDep) -> list[dict[str, Any]]:
    """A user's API keys (ids and dates, never the secret); ``me`` for your own."""
    return await accounts_repo.list_keys(conn, user_id)


@router.post("/users/{user_id}/keys", status_code=201, response_model=KeyCreated, **access("self"))
async def create_key(user_id: str, body: KeyCreate, conn: ConnDep, bus: BusDep, caller: CallerDep) -> dict[str, Any]:
    """Create an API key; the answer is the only time its secret is shown."""
    if await accounts_repo.get_user(conn, user_id) is None:
        raise HTTPException(404, f"user {user_id!r} not found")
    expires = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    key, row = await accounts_repo.create_key(conn, user_id, body.name, expires, caller.user_id)
    rec = await audit.record(conn, caller, AuditAction.key_created, target=f"key:{key.id}", user=user_id,
                             expires_at=expires.isoformat() if expires else None)
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return row | {"key": key.secret}


@router.delete("/users/{user_id}/keys/{key_id}", status_code=204, **access("user_admin"))
async def revoke_key(user_id: str, key_id: str, conn: ConnDep, bus: BusDep, caller: CallerDep) -> Response:
    """Revoke a key: the next request made with it (and any page session signed in with it) is refused."""
    if not await accounts_repo.revoke_key(conn, user_id, key_id):
        raise HTTPException(404, f"user {user_id!r} has no active key {key_id!r}")
    rec = await audit.record(conn, caller, AuditAction.key_revoked, target=f"key:{key_id}", user=user_id)
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return Response(status_code=204)


@router.get("/projects", response_model=list[ProjectOut], **access("user"))
async def list_projects(conn: ConnDep, caller: CallerDep) -> list[dict[str, Any]]:
    """The projects you belong to (every project for the owner), with your role."""
    rows = await accounts_repo.list_projects(conn, caller.readable_projects())
    return [r | {"role": (caller.role_in(r["id"]) or Role.viewer).value} for r in rows]


@router.post("/projects", status_code=201, response_model=ProjectOut, **access("owner"))
async def create_project(body: ProjectCreate, conn: ConnDep, bus: BusDep, caller: CallerDep) -> dict[str, Any]:
    if await accounts_repo.get_project(conn, body.id) is not None:
        raise HTTPException(409, f"project {body.id!r} exists")
    await accounts_repo.create_project(conn, body.id, body.description, caller.user_id)
    rec = await audit.record(conn, caller, AuditAction.project_created, project=body.id, target=f"project:{body.id}")
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return (await accounts_repo.get_project(conn, body.id) or {}) | {"role": Role.admin.value}


@router.get("/projects/{project_id}", response_model=ProjectOut, **access("viewer"))
async def get_project(project_id: str, conn: ConnDep, caller: CallerDep) -> dict[str, Any]:
    row = await accounts_repo.get_project(conn, project_id) or {}
    return row | {"role": (caller.role_in(project_id) or Role.viewer).value}


@router.get("/projects/{project_id}/members", response_model=list[MemberOut], **access("viewer"))
async def list_members(project_id: str, conn: ConnDep) -> list[dict[str, Any]]:
    return await accounts_repo.members(conn, project_id)


@router.put("/projects/{project_id}/members/{user_id}", response_model=MemberOut, **access("admin"))
async def set_member(project_id: str, user_id: str, body: MemberSet, conn: ConnDep, bus: BusDep,
                     caller: CallerDep) -> dict[str, Any]:
    """Add a user to the project or change their role."""
    if await accounts_repo.get_user(conn, user_id) is None:
        raise HTTPException(404, f"user {user_id!r} not found")
    old = await accounts_repo.set_member(conn, project_id, user_id, Role(body.role))
    rec = await audit.record(conn, caller, AuditAction.member_set, project=project_id, target=f"user:{user_id}",
                             role=body.role, previous=old)
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return next(m for m in await accounts_repo.members(conn, project_id) if m["user_id"] == user_id)


@router.delete("/projects/{project_id}/members/{user_id}", status_code=204, **access("admin"))
async def remove_member(project_id: str, user_id: str, conn: ConnDep, bus: BusDep, caller: CallerDep) -> Response:
    if not await accounts_repo.remove_member(conn, project_id, user_id):
        raise HTTPException(404, f"user {user_id!r} is not a member of {project_id!r}")
    rec = await audit.record(conn, caller, AuditAction.member_removed, project=project_id, target=f"user:{user_id}")
    await conn.commit()
    await audit.publish(conn, bus, rec)
    return Response(status_code=204)


@router.get("/projects/{project_id}/audit", response_model=list[AuditOut], **access("admin"))
async def project_audit(project_id: str, conn: ConnDep, limit: AuditLimit = 100,
                        before: Before = None) -> list[dict[str, Any]]:
    """Who did what in this project, newest first."""
    return await audit.read(conn, project_id, limit, before)


@router.get("/audit", response_model=list[AuditOut], **access("owner"))
async def instance_audit(conn: ConnDep, limit: AuditLimit = 100, before: Before = None) -> list[dict[str, Any]]:
    """Every audit record (projects, users, keys, sign-ins), newest first."""
    return await audit.read(conn, None, limit, before)
