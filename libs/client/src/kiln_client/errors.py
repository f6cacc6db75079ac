"""The one exception of the client: what the API (or the way to it) refused, with its status and ``detail``."""

from __future__ import annotations

from typing import Any

import httpx


class KilnError(Exception):
    """A request Kiln refused, or one that could not reach it.

    Attributes:
        status: the HTTP status (``None`` when there was no answer: network, checksum, WebSocket refusal).
        detail: the API's ``detail`` as sent: a string, or for a 422 the list of bad fields.

    Example:
        >>> str(KilnError(404, "job 'j-9' not found"))
        "404: job 'j-9' not found"
        >>> str(KilnError(422, [{"loc": ["body", "train", "epochs"], "msg": "Input should be greater than 0"}]))
        '422: train.epochs: Input should be greater than 0'
    """

    def __init__(self, status: int | None, detail: Any, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.body = body or {}
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """``detail`` in words: a 422's fields one per line, each as ``where: why``."""
        return describe(self.detail)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status is not None else self.message


def describe(detail: Any) -> str:
    """FastAPI's ``detail`` (a string, or a list of ``{"loc", "msg"}``) as text.

    >>> describe([{"loc": ["body", "model"], "msg": "Field required"}, {"loc": ["query", "limit"], "msg": "too big"}])
    'model: Field required; limit: too big'
    """
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
                parts.append(f"{'.'.join(loc)}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def from_response(response: httpx.Response) -> KilnError:
    """The error for a refused answer (read already): the JSON ``detail`` when there is one, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        return KilnError(response.status_code, body["detail"], body)
    text = response.text.strip()[:300]
    return KilnError(response.status_code, text or response.reason_phrase)


def unreachable(url: str, exc: Exception) -> KilnError:
    """The error for a request that got no answer (no secret in it: httpx's message names the URL only)."""
    return KilnError(None, f"cannot reach Kiln at {url}: {exc or type(exc).__name__}")
