"""First start: create the instance owner and their first API key, so that one command gives a usable Kiln."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from kiln_contracts import AuditAction

from ..adapters import accounts_repo, audit
from ..settings import Settings
from . import keys

log = logging.getLogger("kiln.api.auth")


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable only by this user (mode 0600; an existing file is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


async def ensure_owner(engine: AsyncEngine, settings: Settings) -> None:
    """Create the owner when none exists, with ``bootstrap_key`` or a generated key written to ``bootstrap_key_file``."""
    if settings.auth == "off":
        return
    given = settings.bootstrap_key.get_secret_value().strip() if settings.bootstrap_key else None
    if given is not None and keys.key_id_of(given) is None:
        raise ValueError("KILN_API_BOOTSTRAP_KEY is not a Kiln API key (kiln_<10 hex>_<43 url-safe characters>)")
    async with engine.connect() as conn:
        if await accounts_repo.owner_exists(conn):
            return
        if given is None and settings.bootstrap_key_file is None:
            log.warning("no owner exists and no KILN_API_BOOTSTRAP_KEY(_FILE) is set: nobody can sign in yet")
            return
        key = (keys.NewKey(keys.key_id_of(given) or "", given, keys.digest(given)) if given else keys.new_api_key())
        try:
            owner = await accounts_repo.bootstrap_owner(conn, key)
            rec = await audit.record(conn, None, AuditAction.user_created, target=f"user:{owner['id']}",
                                     name=owner["name"], is_owner=True) if owner else None
            await conn.commit()
        except IntegrityError:  # another replica created the owner at the same moment
            await conn.rollback()
            return
        if owner is None:
            return
        if given is None and settings.bootstrap_key_file is not None:
            write_secret(settings.bootstrap_key_file, key.secret)
            log.info("created the owner %r; their API key (%s) is in %s", owner["name"], key.id,
                     settings.bootstrap_key_file)
        else:
            log.info("created the owner %r with the configured bootstrap key %s", owner["name"], key.id)
        del rec  # published by the sweeper (the bus may not be connected yet)
