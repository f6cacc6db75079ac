"""Error answers: a 422 that names every bad field, whatever the input held."""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float spelled out as a string (JSON has no NaN or infinity).

    >>> json_safe({"lr0": float("inf"), "batch": [float("nan"), 1.5], "raw": b"\\xff{"})
    {'lr0': 'inf', 'batch': ['nan', 1.5], 'raw': '\\ufffd{'}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (bytes, bytearray)):  # a body that is not JSON (or not UTF-8): shown, not serialised raw
        return bytes(value[:1000]).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (``detail``: one entry per bad field), safe to serialise for any input."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k != "ctx"} | {"input": json_safe(e.get("input"))} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(json_safe(errors))})
