"""The web page's sign-in (an HttpOnly cookie and a CSRF token) and WebSocket tickets for the notifier."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy import select

from kiln_contracts import AuditAction, tickets
from kiln_store import jobs

from ..adapters import accounts_repo, audit
from ..auth import keys
from ..auth.access import CallerDep, access
from ..auth.authenticate import SESSION_COOKIE
from ..auth.caller import Caller
from ..auth.oidc import OIDCError
from ..auth.oidc_login import FLOW_COOKIE, FLOW_TTL_S, Flow
from ..deps import BusDep, ConnDep, SettingsDep
from ..schemas import PublicConfig, SessionOut, SignIn, TicketOut, TicketRequest

router = APIRouter(tags=["session"])


@router.get("/config", response_model=PublicConfig, **access("public"))
async def client_config(settings: SettingsDep) -> dict[str, Any]:
    """What the web page needs before sign-in: where live events come from and how to sign in."""
    return {"notifier_url": settings.notifier_url, "auth": settings.auth, "oidc_issuer": settings.oidc_issuer,
            "oidc_login": settings.oidc_issuer is not None and settings.oidc_client_id is not None}


@router.post("/session", response_model=SessionOut, **access("public"))
async def sign_in(body: SignIn, request: Request, response: Response, conn: ConnDep, bus: BusDep,
                  settings: SettingsDep) -> dict[str, Any]:
    """Sign the page in with an API key: sets an HttpOnly, Secure, SameSite=Strict session cookie."""
    caller = await request.app.state.authenticator.key_caller(body.api_key, conn)
    row = await _open_session(conn, bus, settings, response, caller)
    return {"user": caller.public(), "csrf_token": row["csrf"], "expires_at": row["expires_at"]}


async def _open_session(conn: ConnDep, bus: BusDep, settings: SettingsDep, response: Response,
                        caller: Caller) -> dict[str, Any]:
    token = keys.new_token()
    ttl = timedelta(seconds=settings.session_ttl_s)
    row = await accounts_repo.create_session(conn, caller.user_id, caller.key_id, keys.digest(token), ttl)
    rec = await audit.record(conn, caller, AuditAction.signed_in, target=f"session:{row['id']}")
    await conn.commit()
    await audit.publish(conn, bus, rec)
    response.set_cookie(SESSION_COOKIE, token, max_age=settings.session_ttl_s, path="/", httponly=True,
                        secure=settings.cookie_secure, samesite="strict")
    caller.via, caller.credential = "session", f"session:{row['id']}"
    return row


def _redirect_uri(request: Request, settings: SettingsDep) -> str:
    base = settings.public_url or str(request.base_url)
    return base.rstrip("/") + "/api/v1/session/oidc/callback"


@router.get("/session/oidc", status_code=302, response_class=RedirectResponse, **access("public"))
async def oidc_sign_in(request: Request, settings: SettingsDep) -> RedirectResponse:
    """Start the page's OIDC sign-in: a redirect to the identity provider (authorization code flow with PKCE)."""
    login = request.app.state.oidc_login
    if login is None:
        raise HTTPException(404, "OIDC sign-in is not configured (KILN_API_OIDC_ISSUER and KILN_API_OIDC_CLIENT_ID)")
    flow = Flow.new()
    response = RedirectResponse(await login.authorization_url(flow, _redirect_uri(request, settings)), 302)
    # Lax, not Strict: the identity provider's redirect back is a cross-site navigation that must carry it.
    response.set_cookie(FLOW_COOKIE, flow.cookie(), max_age=FLOW_TTL_S, path="/api/v1/session/oidc", httponly=True,
                        secure=settings.cookie_secure, samesite="lax")
    return response


@router.get("/session/oidc/callback", status_code=303, response_class=RedirectResponse, **access("public"))
async def oidc_callback(request: Request, conn: ConnDep, bus: BusDep, settings: SettingsDep,
                        code: str | None = None, state: str | None = None,
                        error: str | None = None) -> RedirectResponse:
    """The identity provider's redirect back: checks it, opens a page session, and returns to the page."""
    login = request.app.state.oidc_login
    if login is None:
        raise HTTPException(404, "OIDC sign-in is not configured")
    try:
        if error or not code or not state:
            raise OIDCError(f"the identity provider answered {error or 'without a code'}")
        flow = Flow.from_cookie(request.cookies.get(FLOW_COOKIE))
        subject = await login.subject(flow, code, state, _redirect_uri(request, settings))
        user = await accounts_repo.user_by_subject(conn, subject)
        if user is None or user["disabled_at"] is not None:
            raise OIDCError("you signed in, but no active Kiln user has your identity: ask the owner to add you")
    except OIDCError as exc:
        return RedirectResponse(f"/?signin_error={quote(str(exc))}", 303)
    response = RedirectResponse("/", 303)
    response.delete_cookie(FLOW_COOKIE, path="/api/v1/session/oidc")
    caller = Caller(user["id"], user["name"], user["is_owner"], credential="oidc", via="oidc")
    await _open_session(conn, bus, settings, response, caller)
    return response


@router.get("/session", response_model=SessionOut, **access("user"))
async def current_session(caller: CallerDep, conn: ConnDep) -> dict[str, Any]:
    """The signed-in user and the session's CSRF token (the page reads it after a reload)."""
    if caller.session_id is None:
        raise HTTPException(404, "this request carries no page session (it used an API key or token)")
    return {"user": caller.public(), "csrf_token": caller.csrf,
            "expires_at": await accounts_repo.session_expiry(conn, caller.session_id)}


@router.delete("/session", status_code=204, **access("user"))
async def sign_out(caller: CallerDep, conn: ConnDep, bus: BusDep, settings: SettingsDep) -> Response:
    """End the page session; the cookie is cleared and refused from now on."""
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, secure=settings.cookie_secure, samesite="strict")
    if caller.session_id is not None:
        await accounts_repo.revoke_session(conn, caller.session_id)
        rec = await audit.record(conn, caller, AuditAction.signed_out, target=f"session:{caller.session_id}")
        await conn.commit()
        await audit.publish(conn, bus, rec)
    return response


NOT_FOUND = {"description": "A named job or project does not exist or is not yours; `not_found` lists them all "
                           "(job:<id>, project:<id>).",
             "content": {"application/json": {"example": {"detail": "not found: job 'j-9'", "not_found": ["job:j-9"]}}}}


@router.post("/ws-tickets", response_model=TicketOut, responses={404: NOT_FOUND}, **access("user"))
async def ws_ticket(body: TicketRequest, request: Request, caller: CallerDep, conn: ConnDep) -> Any:
    """A ticket for the notifier naming the jobs and projects one WebSocket will watch (valid 60 s).

    Every job and project must be readable by you: any that is not (or does not exist) answers 404, all of them
    listed in ``not_found``. ``renew_within_s`` is the longest a socket may go without a renewal; a notifier can be
    set stricter, and its ``authorized``/``renewed`` messages give the deadline that applies.
    """
    private = request.app.state.ticket_key
    if private is None:
        raise HTTPException(503, "WebSocket tickets are not configured on this API (ticket_private_key_file)")
    scope, missing = await _scope(conn, caller, body)
    if missing:
        return JSONResponse(status_code=404, content={
            "detail": "not found: " + ", ".join(f"{m.split(':', 1)[0]} {m.split(':', 1)[1]!r}" for m in missing),
            "not_found": missing})
    now = datetime.now(timezone.utc)
    ticket = tickets.issue(tickets.Ticket(sub=caller.user_id, key=caller.credential, projects=body.projects,
                                          jobs=scope), private, now=now.timestamp())
    return {"ticket": ticket, "expires_at": now + timedelta(seconds=tickets.TICKET_TTL_S),
            "renew_within_s": tickets.SOCKET_RECHECK_S}


async def _scope(conn: ConnDep, caller: Caller, body: TicketRequest) -> tuple[dict[str, str], list[str]]:
    """Job id -> project of the requested jobs the caller may read, and every requested item they may not."""
    found: dict[str, str] = {}
    if body.jobs:
        rows = await conn.execute(select(jobs.c.id, jobs.c.project).where(jobs.c.id.in_(body.jobs)))
        found = {j: p for j, p in rows.all() if caller.role_in(p) is not None}
    missing = [f"job:{j}" for j in body.jobs if j not in found]
    for project in body.projects:
        if caller.role_in(project) is None or await accounts_repo.get_project(conn, project) is None:
            missing.append(f"project:{project}")
    return found, missing
