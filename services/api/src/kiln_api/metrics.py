"""The API's Prometheus metrics (docs/operations.md#metrics): requests by route template and status, their
latency, and the jobs created, started and cancelled by pool."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kiln_observability import LATENCY_BUCKETS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"  # no route: label every unknown path the same, so that scanners cannot grow the series
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kiln_api_requests_total", "HTTP requests by method, route template and status.",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("kiln_api_request_duration_seconds", "HTTP request latency, until the response "
                                 "is sent, by method and route template.", ["method", "route"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("kiln_api_requests_in_progress", "HTTP requests being handled.",
                                 registry=registry)
        jobs = ("kiln_api_jobs_created_total", "Jobs created (and re-runs)"), \
            ("kiln_api_jobs_started_total", "Jobs queued: their start command accepted"), \
            ("kiln_api_jobs_cancelled_total", "Cancels accepted")
        self.created, self.started, self.cancelled = (
            Counter(name, f"{doc}, by pool.", ["pool"], registry=registry) for name, doc in jobs)


def route_templates(app: Any) -> dict[int, str]:
    """``id(route)`` -> its full path template.  FastAPI 0.16x keeps included routers nested, so a route's own
    ``path`` lacks the prefixes of the routers that include it; its route context has the whole template."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes with their full path
        return {}
    return {id(c.original_route): c.path_format or c.path or "" for c in iter_route_contexts(app.routes)}


def route_label(scope: Scope, templates: dict[int, str]) -> str:
    """The matched route's template (``/api/v1/jobs/{job_id}``), never the raw path: the label set stays small."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    path = templates.get(id(route)) or getattr(route, "path", "")
    return path if path and not path.endswith("{path}") else "/*"  # "/*": the web page (static files at /)


class RequestMetrics:
    """Pure ASGI middleware: counts each HTTP request and times it until its response body is sent."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, templates: Callable[[], dict[int, str]]) -> None:
        self.app, self.metrics = app, metrics
        self._read_templates, self._templates = templates, None  # read at the first request: every route exists

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception before any response: what the server answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_progress.dec()
            method = scope.get("method", "")
            if self._templates is None:
                self._templates = self._read_templates()
            route, method = route_label(scope, self._templates), method if method in METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)
