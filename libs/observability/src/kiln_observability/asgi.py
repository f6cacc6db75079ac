"""``/metrics``, ``/livez`` and ``/readyz`` on a service's own Starlette/FastAPI app (the API, the notifier).

Starlette is imported only here, so the services without an HTTP framework do not need it.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from .health import Health, body
from .metrics import render


def add_routes(app: Any, registry: CollectorRegistry, health: Health) -> None:
    """Add the three routes to ``app`` (outside any authenticated router; left out of the OpenAPI document)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def metrics(request: Request) -> Response:
        data, content_type = render(registry)
        return Response(data, headers={"Content-Type": content_type})

    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ok, checks = await health.ready()
        return JSONResponse(body(ok, checks), status_code=200 if ok else 503)

    for path, endpoint in (("/metrics", metrics), ("/livez", livez), ("/readyz", readyz)):
        app.add_route(path, endpoint, methods=["GET"], include_in_schema=False)
