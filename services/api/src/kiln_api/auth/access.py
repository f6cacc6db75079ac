"""Authorization, in one place: every ``/api/v1`` route declares what it needs, one dependency enforces it.

A route declares its rule with ``**access(...)`` in its decorator; the rule is published in the OpenAPI document
(``x-kiln-access``), so tests and readers see the same table the code enforces. :func:`authorize` is attached to the
``/api/v1`` router, and :func:`check_rules` refuses to build an app with a route that has no rule.

Needs:
- ``public``: no credentials (sign-in, the page's config).
- ``user``: any signed-in user; what they see is filtered to their projects by the query itself.
- ``owner``: the instance owner only (create users and projects).
- ``viewer`` / ``member`` / ``admin``: that role or above in the project of the ``job_id`` or ``project_id`` in the
  path (or of the request body's ``project``). No role at all answers 404, exactly as a missing object does.
- ``self``: the ``user_id`` in the path is the caller (``me`` works) or the caller is the owner.
- ``user_admin``: ``self``, or an admin of a project the user belongs to (list and revoke their keys).
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_store import DEFAULT_PROJECT, jobs

from ..adapters import accounts_repo
from ..deps import ConnDep
from .caller import Caller
from .roles import WHAT, Role

ACCESS = "x-kiln-access"
NEEDS = ("public", "user", "owner", "viewer", "member", "admin", "self", "user_admin")
ANONYMOUS_OWNER = Caller("anonymous", "anonymous", True, credential="none", via="none")


def access(need: str, *, project_from_body: bool = False, rate: str | None = None) -> dict[str, Any]:
    """Decorator keywords that declare a route's rule, e.g. ``@router.post("", **access("member", rate="create"))``."""
    assert need in NEEDS, need
    rule: dict[str, Any] = {"need": need}
    if project_from_body:
        rule["project_from_body"] = True
    if rate:
        rule["rate"] = rate
    return {"openapi_extra": {ACCESS: rule}}


def rule_of(route: Any) -> dict[str, Any] | None:
    return (getattr(route, "openapi_extra", None) or {}).get(ACCESS)


def check_rules(app: FastAPI, prefix: str = "/api/v1") -> None:
    """Refuse to start with an ``/api/v1`` route that declares no access rule."""
    missing = [f"{sorted(r.methods)} {r.path}" for r in app.routes
               if isinstance(r, APIRoute) and r.path.startswith(prefix) and rule_of(r) is None]
    if missing:
        raise RuntimeError(f"routes without an access rule: {missing}")


class RateLimiter:
    """Per-credential limits (``limits``' moving window): ``limits`` maps a name ("create") to e.g. "60/minute"."""

    def __init__(self, limits: dict[str, str], storage: str = "memory://") -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage))
        self._limits = {name: parse(text) for name, text in limits.items()}

    def hit(self, name: str, who: str) -> None:
        item = self._limits[name]
        if not self._limiter.hit(item, name, who):
            reset = self._limiter.get_window_stats(item, name, who).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise HTTPException(429, f"too many requests: at most {item} for this key; retry in {wait} s",
                                headers={"Retry-After": str(wait)})


async def authorize(request: Request, conn: ConnDep) -> None:
    """The one authorization dependency of ``/api/v1`` (see the module doc); shares the route's connection."""
    rule = rule_of(request.scope.get("route"))
    if rule is None:  # check_rules makes this unreachable; fail closed anyway
        raise HTTPException(403, "this route has no access rule")
    need = rule["need"]
    if need == "public":
        return
    app = request.app
    if app.state.settings.auth == "off":
        caller = ANONYMOUS_OWNER
    else:
        caller = await app.state.authenticator.caller(request, conn)
    request.state.caller = caller
    if need in ("viewer", "member", "admin"):
        await _check_role(request, conn, caller, Role(need), rule)
    elif need == "owner" and not caller.is_owner:
        raise HTTPException(403, "only the instance owner may do this")
    elif need in ("self", "user_admin"):
        await _check_user(request, conn, caller, need)
    if rule.get("rate"):
        # per key (a page session counts against the key it signed in with); per user for OIDC tokens
        app.state.rate_limiter.hit(rule["rate"], caller.key_id or f"user:{caller.user_id}")


async def _check_role(request: Request, conn: AsyncConnection, caller: Caller, needed: Role,
                      rule: dict[str, Any]) -> None:
    params = request.path_params
    if "job_id" in params:
        what = f"job {params['job_id']!r}"
        project = (await conn.execute(select(jobs.c.project).where(jobs.c.id == params["job_id"]))).scalar()
    else:
        if "project_id" in params:
            project = params["project_id"]
        elif rule.get("project_from_body"):
            try:  # FastAPI validates the body after this; here only its project matters
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                body = {}
            project = body.get("project", DEFAULT_PROJECT) if isinstance(body, dict) else DEFAULT_PROJECT
            project = project if isinstance(project, str) else DEFAULT_PROJECT
        else:
            raise HTTPException(403, "this route names no project to check")
        what = f"project {project!r}"
        if await accounts_repo.get_project(conn, project) is None:
            project = None
    role = caller.role_in(project) if project is not None else None
    if role is None:  # missing, or not the caller's: the same answer, so ids of others' work leak nothing
        raise HTTPException(404, f"{what} not found")
    if not role.allows(needed):
        above = "admin" if needed is Role.admin else f"{needed.value} or admin"
        raise HTTPException(403, f"your role in project {project!r} is {role.value}; {above} is needed to "
                                 f"{WHAT[needed]}")


async def _check_user(request: Request, conn: AsyncConnection, caller: Caller, need: str) -> None:
    params = request.path_params
    if params.get("user_id") == "me":
        params["user_id"] = caller.user_id
    user_id = params.get("user_id")
    if user_id == caller.user_id or caller.is_owner:
        return
    if need == "user_admin" and user_id and await accounts_repo.share_a_project_as_admin(conn, caller.user_id, user_id):
        return
    raise HTTPException(404, f"user {user_id!r} not found")


def current_caller(request: Request) -> Caller:
    caller = getattr(request.state, "caller", None)
    if caller is None:
        raise HTTPException(401, "not signed in")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]
