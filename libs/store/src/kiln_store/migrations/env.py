"""Alembic environment: runs on the connection handed in by kiln_store.db.upgrade."""

from alembic import context

from kiln_store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through kiln_store.db.upgrade(engine) or `kiln-store upgrade URL`")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
