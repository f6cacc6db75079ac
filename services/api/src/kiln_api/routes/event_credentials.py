"""Read-only NATS credentials for third-party subscribers of a project's events (docs/events.md)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from kiln_contracts import AuditAction, utcnow
from kiln_contracts.natsauth.provision import third_party_consumers

from ..adapters import audit
from ..adapters import event_creds_repo as repo
from ..auth.access import CallerDep, access
from ..deps import BusDep, ConnDep, IssuerDep
from ..schemas import EventCredentialsCreate, EventCredentialsCreated, EventCredentialsOut

router = APIRouter(tags=["event credentials"])
log = logging.getLogger("kiln.api.event_creds")
BASE = "/projects/{project_id}/event-credentials"


def consumers(project: str, name: str) -> list[dict[str, str]]:
    """The durables a reader binds, as its answer lists them.

    >>> [c["filter_subject"] for c in consumers("vision", "acme")]
    ['kiln.evt.vision.>', 'kiln.log.vision.*']
    """
    return [{"stream": d.stream, "durable": d.config.durable_name or "",
             "filter_subject": d.config.filter_subject or ""} for d in third_party_consumers(project, name)]


def view(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A stored credential as listed: its consumers and whether it still works."""
    status = "revoked" if row["revoked_at"] else "expired" if row["expires_at"] <= now else "active"
    return {"id": row["id"], "project": row["project_id"], "name": row["name"], "public_key": row["public_key"],
            "consumers": consumers(row["project_id"], row["name"]), "created_at": row["created_at"],
            "created_by": row["created_by"], "created_by_name": row.get("created_by_name"),
            "expires_at": row["expires_at"], "revoked_at": row["revoked_at"], "status": status}


@router.post(BASE, status_code=201, response_model=EventCredentialsCreated, **access("admin", rate="create"))
async def create_event_credentials(project_id: str, body: EventCredentialsCreate, conn: ConnDep, bus: BusDep,
                                   issuer: IssuerDep, caller: CallerDep) -> dict[str, Any]:
    """Credentials that read this project's events and logs through durables made for them, and nothing else.

    The answer is the only time the ``.creds`` text is shown; only its public key is kept.
    """
    now = utcnow()
    expires = now + timedelta(days=body.expires_in_days)
    async with issuer.changing:
        if await repo.active_named(conn, project_id, body.name):
            raise HTTPException(409, f"event credentials named {body.name!r} are active in project {project_id!r}: "
                                     "revoke them first, or choose another name")
        try:
            issued = await issuer.issue(bus.js, project_id, body.name, int(expires.timestamp()))
        except Exception as exc:  # noqa: BLE001 - NATS refused or timed out; nothing was stored
            log.warning("event credentials %s of %s: durables not created: %r", body.name, project_id, exc)
            raise HTTPException(503, f"NATS did not create the durables ({type(exc).__name__}); try again") from None
        row = await repo.create(conn, project_id, body.name, issued.minted.public_key, caller.user_id, now, expires)
        rec = await audit.record(conn, caller, AuditAction.event_credentials_created, project=project_id,
                                 target=f"event-credentials:{row['id']}", name=body.name,
                                 public_key=issued.minted.public_key, expires_at=expires.isoformat(),
                                 durables=[d.config.durable_name for d in issued.durables])
        await conn.commit()
    await audit.publish(conn, bus, rec)
    return view(row | {"created_by_name": caller.name}, now) | {
        "creds": issued.minted.creds, "inbox_prefix": issued.minted.inbox_prefix, "nats_urls": issuer.public_urls}


@router.get(BASE, response_model=list[EventCredentialsOut], **access("admin"))
async def list_event_credentials(project_id: str, conn: ConnDep, _: IssuerDep) -> list[dict[str, Any]]:
    """The project's event credentials, newest first, with creator and expiry (never the secret)."""
    now = utcnow()
    return [view(r, now) for r in await repo.list_for(conn, project_id)]


@router.delete(BASE + "/{cred_id}", status_code=204, **access("admin"))
async def revoke_event_credentials(project_id: str, cred_id: str, conn: ConnDep, bus: BusDep, issuer: IssuerDep,
                                   caller: CallerDep) -> Response:
    """Revoke: the server closes the reader's connections at once and refuses new ones; its durables are deleted."""
    async with issuer.changing:
        row = await repo.get(conn, project_id, cred_id)
        if row is None or row["revoked_at"] is not None:
            raise HTTPException(404, f"no active event credentials {cred_id!r} in project {project_id!r}")
        try:
            await issuer.revoke(bus.js, project_id, row["name"], row["public_key"],
                                int(row["expires_at"].timestamp()))
        except Exception as exc:  # noqa: BLE001 - not pushed (or durables not deleted): the admin retries
            log.warning("event credentials %s of %s: revocation not completed: %r", cred_id, project_id, exc)
            raise HTTPException(503, f"NATS did not take the revocation ({type(exc).__name__}); try again") from None
        await repo.mark_revoked(conn, cred_id, utcnow())
        rec = await audit.record(conn, caller, AuditAction.event_credentials_revoked, project=project_id,
                                 target=f"event-credentials:{cred_id}", name=row["name"], public_key=row["public_key"])
        await conn.commit()
    await audit.publish(conn, bus, rec)
    return Response(status_code=204)
