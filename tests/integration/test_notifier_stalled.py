"""One stalled WebSocket client and 100 live ones: the stalled one is cut off (1013, with its cursor), the live
ones keep receiving everything, promptly."""

import asyncio
import contextlib
import json
import time

import pytest
import websockets

from kiln_testing.notifier import (
    Publisher,
    authorized,
    connect_js,
    expect,
    ids,
    new_job,
    running_notifier,
    small_window_socket,
    ticket,
    ws_connect,
)


@pytest.fixture()
async def js(nats_url: str):
    nc, js = await connect_js(nats_url)
    yield js
    await nc.close()


async def test_one_stalled_client_never_slows_100_live_ones(nats_url: str, js) -> None:
    noisy_job, noisy_project = new_job()
    live_job, live_project = new_job()
    noisy, live = Publisher(js, noisy_job, noisy_project), Publisher(js, live_job, live_project)
    with running_notifier(nats_url, client_queue=8, close_timeout_s=30) as address:
        stalled = await ws_connect(address, f"/api/v1/ws/jobs/{noisy_job}", ticket(jobs={noisy_job: noisy_project}),
                                   sock=small_window_socket(address), max_queue=1)
        scope = ticket(jobs={live_job: live_project})
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_connect(address, f"/api/v1/ws/jobs/{live_job}", scope))
                       for _ in range(100)]
            for ws in clients:
                await authorized(ws)
                await expect(ws, "subscribed")

            async def read_all(ws, n):  # type: ignore[no-untyped-def]
                got = []
                while len(got) < n:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if msg["type"] == "event":
                        got.append(msg)
                return got

            readers = [asyncio.create_task(read_all(ws, 50)) for ws in clients]
            published = []
            for i in range(100):  # ~6 MB at the stalled client: more than the kernel buffers absorb
                await noisy.noisy_logs(64_000)
                if i % 2 == 0:
                    published.append(await live.epoch(i // 2 + 1, epochs=50))
            done_at = time.monotonic()
            received = await asyncio.gather(*readers)
            lag = time.monotonic() - done_at
        want = [e.id for e in published]
        assert all(ids(got) == want for got in received), "a live client missed or reordered events"
        # A relay blocked by the stalled socket would hold them until its 30 s close timeout, or forever.
        assert lag < 10.0, f"live clients finished {lag:.2f}s after the last publish"

        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                msg = json.loads(await asyncio.wait_for(stalled.recv(), 20))
                last = msg
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert last["type"] == "overflow" and f"job:{noisy_job}" in last["dropped_after"]
