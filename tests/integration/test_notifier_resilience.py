"""Notifier across a NATS restart: live views resume by themselves, without gaps or duplicates."""

from __future__ import annotations


from kiln_testing.notifier import (  # noqa: E402
    Publisher,
    authorized,
    connect_js,
    events,
    expect,
    ids,
    new_job,
    running_notifier,
    silence,
    ticket,
    ws_connect,
)


async def test_nats_restart_resumes_live_view(nats_server) -> None:
    job_id, project = new_job()
    with running_notifier(nats_server.url, consumer_idle_heartbeat_s=0.5) as address:
        nc, js = await connect_js(nats_server.url)
        pub = Publisher(js, job_id, project)
        async with ws_connect(address, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
            await authorized(ws)
            await expect(ws, "subscribed")
            before = [await pub.epoch(1), await pub.epoch(2)]
            assert ids(await events(ws, 2)) == [e.id for e in before]
            await nc.close()

            nats_server.stop()  # the ordered consumers (in memory) are gone with it
            nats_server.start()
            nc, js = await connect_js(nats_server.url)
            pub.js = js
            after = [await pub.epoch(3), await pub.finished()]
            # The notifier reconnects, its consumers notice the silence and are recreated after seq 2.
            assert ids(await events(ws, 2, timeout=20)) == [e.id for e in after]
            await silence(ws)
        await nc.close()
