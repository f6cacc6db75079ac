"""Follow a job live over the notifier's WebSocket and print epochs, status and (optionally) logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import websockets

# Scores first (what shows a model learning), then the training losses, then the rest; short names, 3 decimals.
_SHOW = (("metrics/mAP50(B)", "mAP50"), ("metrics/mAP50-95(B)", "mAP50-95"), ("metrics/accuracy_top1", "top1"),
         ("train/box_loss", "box"), ("train/cls_loss", "cls"), ("train/dfl_loss", "dfl"), ("train/loss", "loss"),
         ("metrics/precision(B)", "P"), ("metrics/recall(B)", "R"))


def format_epoch(data: dict[str, Any]) -> str:
    """One line per epoch, aligned from one epoch to the next.

    >>> format_epoch({"epoch": 7, "epochs": 20, "epoch_time": 3.4, "metrics": {
    ...     "train/box_loss": 1.2345, "train/cls_loss": 0.98, "metrics/mAP50(B)": 0.4121}})
    'epoch  7/20  mAP50 0.412  box 1.234  cls 0.980  (3.4s)'
    """
    m = data.get("metrics", {})
    parts = [f"{name} {m[k]:.3f}" for k, name in _SHOW if m.get(k) is not None]
    t = data.get("epoch_time")
    return (f"epoch {data['epoch']:>{len(str(data['epochs']))}}/{data['epochs']}  " + "  ".join(parts)
            + (f"  ({t:.1f}s)" if t else ""))


async def follow(ws_url: str, job_id: str, *, show_logs: bool = False, timeout: float = 3600.0,
                 out: Callable[[str], None] = print,
                 ticket: Callable[[], Awaitable[str]] | None = None) -> dict[str, Any]:
    """Print the job's events until it finishes; returns the ``finished`` payload. Reconnects with its cursor.

    ``ticket`` fetches a fresh WebSocket ticket from the API for each connection (sent as a subprotocol, never in
    the URL); a socket open longer than the notifier's re-check interval is closed (4401) and simply reconnects.
    """
    cursor = {"events": 0, "logs": 0}

    async def run() -> dict[str, Any]:
        while True:
            url = f"{ws_url}/api/v1/ws/jobs/{job_id}?after_events={cursor['events']}&after_logs={cursor['logs']}"
            try:
                protocols = ["kiln.v1", "kiln.ticket." + await ticket()] if ticket else None
                async with websockets.connect(url, max_size=None, subprotocols=protocols) as ws:
                    async for raw in ws:
                        msg = json.loads(raw)
                        if msg.get("type") != "event":
                            continue
                        cursor[msg["stream"]] = msg["seq"]
                        data = msg["event"]["data"]
                        kind = data["kind"]
                        if kind == "epoch":
                            out(format_epoch(data))
                        elif kind == "status":
                            out(f"status: {data['status']}" + (f" ({data['reason']})" if data.get("reason") else ""))
                        elif kind == "finished":
                            out(f"status: {data['status']}" + (f": {data['reason']}" if data.get("reason") else "")
                                + (f" (exit code {data['exit_code']})" if data.get("exit_code") is not None else ""))
                            return data
                        elif kind == "log" and show_logs:
                            for line in data["lines"]:
                                out(f"  | {line['text']}")
            except (OSError, websockets.WebSocketException) as exc:
                out(f"(connection to the notifier lost: {exc}; reconnecting)")
                await asyncio.sleep(1)

    return await asyncio.wait_for(run(), timeout)
