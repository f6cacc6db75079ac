"""Migration 0004 and the API's event-credentials queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from kiln_api.adapters import accounts_repo
from kiln_api.adapters import event_creds_repo as repo
from kiln_contracts import utcnow
from kiln_store import event_credentials, make_engine, metadata, upgrade
from kiln_store.db import _alembic_config  # the migrations' own configuration, to go down one step


def test_the_table_its_queries_and_a_downgrade(db_url: str) -> None:
    async def run() -> None:
        engine = make_engine(db_url)
        await upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
            assert not [d for d in diff if event_credentials.name in repr(d)], diff  # migration == schema.py
            owner = await accounts_repo.create_user(conn, "ada")
            await accounts_repo.create_project(conn, "vision", "", owner["id"])
            now = utcnow()
            old = await repo.create(conn, "vision", "acme", "U" + "A" * 55, owner["id"], now - timedelta(days=9),
                                    now - timedelta(days=2))
            assert await repo.active_named(conn, "vision", "acme") is None  # expired: the name is free
            new = await repo.create(conn, "vision", "acme", "U" + "B" * 55, owner["id"], now, now + timedelta(days=1))
            assert (await repo.active_named(conn, "vision", "acme") or {})["id"] == new["id"]
            listed = await repo.list_for(conn, "vision")
            assert [r["id"] for r in listed] == [new["id"], old["id"]]
            assert listed[0]["created_by_name"] == "ada" and listed[0]["expires_at"].tzinfo is not None
            assert await repo.get(conn, "other", new["id"]) is None
            assert await repo.mark_revoked(conn, new["id"], now)
            assert not await repo.mark_revoked(conn, new["id"], now)  # once
            assert await repo.active_named(conn, "vision", "acme") is None
            await conn.commit()
        async with engine.begin() as conn:  # down to 0003: the table goes, the rest stays
            await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), "0003"))
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
            assert event_credentials.name not in tables and "projects" in tables
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await repo.list_for(conn, "vision") == []
        await engine.dispose()

    asyncio.run(run())
