"""kiln_observability.logs: JSON and text lines, the job context, levels, secrets redacted."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from kiln_observability.logs import job_context, redact, resolve_level, setup_logging

API_KEY = "kiln_0123456789_" + "A" * 43
SEED = "SUAM" + "A" * 54
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBQkMiLCJpYXQiOjE3MDB9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture()
def capture():
    """setup_logging into a buffer; the root logger's handlers and level are put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()

    def start(fmt: str = "json", level: str | None = "DEBUG") -> io.StringIO:
        setup_logging("test-svc", level=level, fmt=fmt, stream=out)
        return out

    yield start
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_job_context_and_nothing_outside_it(capture):
    out = capture("json")
    log = logging.getLogger("kiln.test")
    log.info("before")
    with job_context("j1", 2, "vision"):
        log.info("inside %s", "j1")
        with job_context("j2", 1, "other"):
            log.warning("nested")
        log.info("back")
    log.info("after")
    log.info("one line about a job", extra={"job_id": "j9", "attempt": 3, "project": "p"})
    got = [(x["message"], x["job_id"], x["attempt"], x["project"], x["trace_id"]) for x in lines(out)]
    assert got == [("before", "", None, "", ""), ("inside j1", "j1", 2, "vision", ""), ("nested", "j2", 1, "other", ""),
                   ("back", "j1", 2, "vision", ""), ("after", "", None, "", ""),
                   ("one line about a job", "j9", 3, "p", "")]
    first = lines(out)[0]
    assert first["service"] == "test-svc" and first["level"] == "INFO" and first["logger"] == "kiln.test"
    assert first["time"].endswith("+00:00")


def test_tasks_created_inside_a_job_context_keep_it(capture):
    out = capture("json")
    log = logging.getLogger("kiln.test")

    async def main() -> None:
        async def later() -> None:
            await asyncio.sleep(0.01)
            log.info("from a task")

        with job_context("j1", 1, "p"):
            task = asyncio.create_task(later())
        log.info("outside")  # the context was reset here, not in the task
        await task

    asyncio.run(main())
    got = {(x["message"], x["job_id"]) for x in lines(out) if x["logger"] == "kiln.test"}
    assert got == {("outside", ""), ("from a task", "j1")}


def test_text_lines_name_the_job_and_tracebacks_stay_after_it(capture):
    out = capture("text")
    log = logging.getLogger("kiln.test")
    with job_context("j1", 1, "p"):
        try:
            raise ValueError(f"boom with {API_KEY}")
        except ValueError:
            log.exception("failed")
    text = out.getvalue()
    first = text.splitlines()[0]
    assert first.endswith("kiln.test ERROR failed [job=j1 attempt=1 project=p]"), first
    assert "Traceback" in text and "ValueError: boom with kiln_0123456789_[redacted]" in text and API_KEY not in text


@pytest.mark.parametrize("secret, shown", [
    (API_KEY, "kiln_0123456789_[redacted]"),
    (f"Authorization: Bearer {API_KEY}", "Authorization: Bearer [redacted]"),
    ("authorization: bearer abc.def-ghi", "authorization: bearer [redacted]"),
    ("GET /api/v1/ws?ticket=abc.def.ghi&x=1", "GET /api/v1/ws?ticket=[redacted]&x=1"),
    ("subprotocol kiln.ticket.abc.def", "subprotocol kiln.ticket.[redacted]"),
    (f"-----BEGIN NATS USER JWT-----\n{JWT}\n------END NATS USER JWT------", "[redacted-jwt]"),
    (f"seed {SEED} in creds", "seed [redacted-seed] in creds"),
    ("postgresql+asyncpg://kiln:hunter2@db:5432/kiln", "postgresql+asyncpg://kiln:[redacted]@db:5432/kiln"),
    ("nats://svc:pa55@127.0.0.1:4222", "nats://svc:[redacted]@127.0.0.1:4222"),
])
def test_secrets_are_redacted(secret, shown):
    assert shown in redact(secret)
    for part in ("hunter2", "pa55", SEED, JWT, API_KEY, "abc.def"):
        if part in secret:
            assert part not in redact(secret)


def test_redaction_keeps_ordinary_text_and_ids():
    for text in ("job 3f2a attempt 1: completed", "key kiln_0123456789 revoked", "nats://127.0.0.1:4222",
                 "sqlite+aiosqlite:///var/kiln.db", "Bearer"):
        assert redact(text) == text


def test_secrets_in_arguments_and_json_lines_are_redacted(capture):
    out = capture("json")
    logging.getLogger("kiln.test").warning("connecting to %s with %s", "nats://u:secret@h:4222", SEED)
    (line,) = lines(out)
    assert "secret" not in json.dumps(line) and SEED not in json.dumps(line)


def test_levels_come_from_the_service_then_kiln_log_level(monkeypatch, capture):
    monkeypatch.delenv("KILN_LOG_LEVEL", raising=False)
    assert resolve_level(None) == "INFO"
    monkeypatch.setenv("KILN_LOG_LEVEL", "warning")
    assert resolve_level(None) == "WARNING" and resolve_level("debug") == "DEBUG"
    out = capture("json", level=None)
    logging.getLogger("kiln.test").info("hidden")
    logging.getLogger("kiln.test").warning("shown")
    assert [x["message"] for x in lines(out)] == ["shown"]


def test_libraries_with_their_own_handler_go_through_ours(capture):
    own = logging.getLogger("faststream")
    own.addHandler(logging.StreamHandler(io.StringIO()))
    own.propagate = False
    out = capture("json")
    own.info("from faststream")
    assert not own.handlers and [x["logger"] for x in lines(out)] == ["faststream"]


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text or json"):
        setup_logging("svc", fmt="yaml", stream=io.StringIO())
