"""FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from kiln_contracts import JobSpec, StartJob
from kiln_store import make_engine, upgrade

from . import errors
from .adapters import jobs_repo
from .adapters.bus import Bus
from .routes import artifacts, jobs
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
                log.info("republished start of %s attempt %s", job["id"], job["attempt"])
        except Exception as exc:  # noqa: BLE001 - keep sweeping
            log.warning("sweep failed: %s", exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.engine = make_engine(settings.database_url)
        await upgrade(app.state.engine)
        app.state.bus = await Bus.connect(settings.nats_url)
        sweeper = asyncio.create_task(_sweep(app, settings))
        try:
            yield
        finally:
            sweeper.cancel()
            await app.state.bus.close()
            await app.state.engine.dispose()

    app = FastAPI(title="Kiln API", version="0.1.0", lifespan=lifespan,
                  description="Create, start, watch and cancel YOLO training jobs.")
    app.add_exception_handler(RequestValidationError, errors.validation_error)
    app.include_router(jobs.router, prefix="/api/v1")
    app.include_router(artifacts.router, prefix="/api/v1")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        ok = app.state.bus.nc.is_connected
        return JSONResponse({"status": "ok" if ok else "degraded", "nats": ok}, status_code=200 if ok else 503)

    @app.get("/api/v1/config", tags=["ops"])
    async def client_config() -> dict[str, str]:
        """What the web page needs to know: where live events come from."""
        return {"notifier_url": settings.notifier_url}

    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
