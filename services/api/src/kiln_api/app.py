"""FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from kiln_contracts import JobSpec, StartJob, streams
from kiln_observability import Observability, database, job_context
from kiln_observability.asgi import add_routes
from kiln_store import make_engine, upgrade

from . import errors
from .adapters import accounts_repo, audit, jobs_repo
from .adapters.bus import Bus
from .adapters.event_creds import ThirdPartyIssuer
from .auth.access import RateLimiter, authorize, check_rules
from .auth.authenticate import Authenticator
from .auth.bootstrap import ensure_owner
from .auth.oidc import OIDCVerifier
from .auth.oidc_login import OIDCLogin
from .limits import BodySizeLimit
from .metrics import ApiMetrics, RequestMetrics, route_templates
from .routes import accounts, artifacts, event_credentials, jobs, session
from .settings import Settings

log = logging.getLogger("kiln.api")
WEB_DIR = Path(__file__).parent / "web"


async def _sweep(app: FastAPI, settings: Settings) -> None:
    """Republish start commands that may have been lost between the DB commit and the publish (same msg id)."""
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            async with app.state.engine.connect() as conn:
                stale = await jobs_repo.unacknowledged_submissions(conn, timedelta(seconds=settings.sweep_after_s))
            for job in stale:
                cmd = StartJob(job_id=job["id"], attempt=job["attempt"], spec=JobSpec.model_validate(job["spec"]),
                               issued_at=job["submitted_at"])
                await app.state.bus.publish_start(cmd)
                with job_context(cmd.job_id, cmd.attempt, cmd.spec.project):
                    log.info("republished start of %s attempt %s", job["id"], job["attempt"])
            async with app.state.engine.connect() as conn:
                records = await audit.unpublished(conn)
                await audit.publish(conn, app.state.bus, *records)
                await accounts_repo.purge_sessions(conn)
                await conn.commit()
        except Exception as exc:  # noqa: BLE001 - keep sweeping
            log.warning("sweep failed: %s", exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    obs = Observability()  # no server of its own: /metrics, /livez, /readyz are routes of this app
    connected: list[bool] = []  # ready only once the lifespan has connected (NATS and the database)
    obs.health.add("started", lambda: bool(connected))
    obs.health.add("nats", lambda: bool(connected) and app.state.bus.nc.is_connected)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.event_creds = ThirdPartyIssuer.from_settings(settings)  # reads its files: fails before the rest
        app.state.engine = make_engine(settings.database_url)
        await upgrade(app.state.engine)
        await ensure_owner(app.state.engine, settings)
        app.state.bus = await Bus.connect(settings.nats_url, settings.nats_creds_file, settings.nats_inbox_prefix,
                                          settings.streams_wait_s, settings.nats_tls)
        if app.state.event_creds is None:
            log.info("third-party event credentials off: no NATS trust directory (KILN_API_NATS_TRUST_DIR)")
        obs.health.add("database", database(app.state.engine))
        # Streams the API may read (its identity's STREAM.INFO rights); the durables are their owners' to report.
        obs.watch_jetstream(app.state.bus.js, [s.name or "" for s in (streams.JOBS, streams.EVENTS, streams.AUDIT)],
                            [])
        await obs.start()
        connected.append(True)
        sweeper = asyncio.create_task(_sweep(app, settings))
        try:
            yield
        finally:
            obs.health.draining = True
            await obs.stop()
            sweeper.cancel()
            await app.state.bus.close()
            await app.state.engine.dispose()

    app = FastAPI(title="Kiln API", version="0.1.0", lifespan=lifespan,
                  description="Create, start, watch and cancel YOLO training jobs. Every /api/v1 route needs an "
                              "API key (Authorization: Bearer kiln_...), an OIDC access token where configured, or "
                              "the web page's session cookie; x-kiln-access on each operation says who may call it.")
    app.state.settings = settings
    app.state.authenticator = Authenticator(
        OIDCVerifier(settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_url, settings.oidc_user_claim,
                     settings.oidc_leeway_s) if settings.oidc_issuer else None)
    app.state.oidc_login = (OIDCLogin(settings.oidc_issuer, settings.oidc_client_id,
                                      settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret
                                      else None, settings.oidc_user_claim, settings.oidc_leeway_s)
                            if settings.oidc_issuer and settings.oidc_client_id else None)
    app.state.rate_limiter = RateLimiter({"create": settings.create_rate_limit}, settings.rate_limit_storage)
    app.state.event_creds = None  # set in the lifespan when the NATS trust directory is configured
    app.state.obs, app.state.metrics = obs, ApiMetrics(obs.registry)
    app.state.ticket_key = (settings.ticket_private_key_file.read_bytes() if settings.ticket_private_key_file
                            else None)
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])
    for module in (jobs, artifacts, accounts, event_credentials, session):
        api.include_router(module.router)
    app.include_router(api)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics,  # outermost: a 413 is counted too
                       templates=lambda: route_templates(app))
    add_routes(app, obs.registry, obs.health)  # outside /api/v1: no credentials (keep it off public proxies)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        ok = app.state.bus.nc.is_connected
        return JSONResponse({"status": "ok" if ok else "degraded", "nats": ok}, status_code=200 if ok else 503)

    check_rules(app)
    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
