"""S3 datasets through a real runner process and moto's S3-compatible server (boto3 unpatched)."""

import signal

import nats
import pytest

from kiln_contracts import JobStatus, streams
from kiln_testing.runners import EventLog, RunnerProc, publish_start, read_fake_log, spec


@pytest.fixture()
async def env(nats_server, tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    client = s3.client()
    client.create_bucket(Bucket="data")
    for i in range(3):
        client.put_object(Bucket="data", Key=f"shapes/images/train/{i}.jpg", Body=b"x" * (100 + i))
    client.put_object(Bucket="data", Key="shapes/data.yaml", Body=b"path: /elsewhere\ntrain: images/train\n"
                                                                   b"val: images/train\nnames: {0: a}\n")
    runner = RunnerProc(nats_server.url, tmp_path / "runners", "s3runner", tmp_path / "fake.log", slots=2,
                        s3_endpoint_url=s3.url, s3_allowed_buckets=["data", "missing-bucket"])
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    runner.wait_ready()
    yield js, log, client, tmp_path
    runner.kill(signal.SIGKILL)
    runner.proc.wait()
    await nc.close()
    for obj in client.list_objects_v2(Bucket="data").get("Contents", []):
        client.delete_object(Bucket="data", Key=obj["Key"])
    client.delete_bucket(Bucket="data")


def running_details(log, job):
    return next(e.data.details for e in log.of(job, "status") if e.data.status == JobStatus.running)


async def log_lines(js, job):
    sub = await js.subscribe(f"kiln.log.*.{job}", ordered_consumer=True)
    lines = []
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            from kiln_contracts import Event

            lines += [ln.text for ln in Event.model_validate_json(msg.data).data.lines]
    except Exception:  # noqa: BLE001 - no more messages
        pass
    await sub.unsubscribe()
    return lines


async def test_s3_dataset_downloaded_once_for_two_concurrent_jobs(env):
    js, log, client, tmp = env
    for j in ("s3a", "s3b"):
        await publish_start(js, j, spec("s3://data/shapes", seconds=1))
    await log.wait(lambda: log.finished("s3a") and log.finished("s3b"), timeout=60)
    assert [log.finished(j)[0].data.status for j in ("s3a", "s3b")] == [JobStatus.completed] * 2
    a, b = running_details(log, "s3a"), running_details(log, "s3b")
    assert a["dataset_snapshot"] == b["dataset_snapshot"] and len(a["dataset_snapshot"]) == 64
    assert sorted([a["dataset_cached"], b["dataset_cached"]]) == [False, True]  # one download, one cache hit
    lines = await log_lines(js, "s3a") + await log_lines(js, "s3b")
    assert sum("downloading dataset s3://data/shapes" in ln for ln in lines) == 1
    data_yaml = a["dataset_path"]
    assert data_yaml.endswith("data.yaml")
    text = open(data_yaml).read()
    assert "/elsewhere" not in text and a["dataset_snapshot"] in text  # path points at the cache folder

    # a changed object is a new snapshot
    client.put_object(Bucket="data", Key="shapes/images/train/0.jpg", Body=b"changed")
    await publish_start(js, "s3c", spec("s3://data/shapes", seconds=0.5))
    await log.wait(lambda: log.finished("s3c"), timeout=60)
    c = running_details(log, "s3c")
    assert c["dataset_snapshot"] != a["dataset_snapshot"] and c["dataset_cached"] is False


@pytest.mark.parametrize("uri, reason", [
    ("s3://missing-bucket/x", "bucket not found: missing-bucket"),
    ("s3://data/no/such/prefix", "no objects under s3://data/no/such/prefix"),
    ("s3://forbidden/x", "bucket 'forbidden' is not allowed on this runner"),
])
async def test_s3_dataset_problems_fail_the_job_with_the_reason(env, uri, reason):
    js, log, client, tmp = env
    await publish_start(js, "bad", spec(uri, seconds=0.5))
    await log.wait(lambda: log.finished("bad"), timeout=30)
    fin = log.finished("bad")[0].data
    assert fin.status == JobStatus.failed and reason in fin.reason
    assert not [r for r in read_fake_log(tmp / "fake.log") if r[1] == "bad"]
