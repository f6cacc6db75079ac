"""`python -m kiln_store upgrade [DATABASE_URL]`: apply the Alembic migrations to a database.

The URL may carry a password: give it in ``KILN_DATABASE_URL`` rather than on the command line (argv is visible to
every user of the host).
"""

import asyncio
import os
import sys

from .db import make_engine, upgrade


def main() -> None:
    args = sys.argv[1:]
    url = args[1] if len(args) == 2 else os.environ.get("KILN_DATABASE_URL")
    if not args or args[0] != "upgrade" or len(args) > 2 or not url:
        sys.exit("usage: KILN_DATABASE_URL=... python -m kiln_store upgrade  (or: python -m kiln_store upgrade URL)")

    async def run() -> None:
        engine = make_engine(url)
        await upgrade(engine)
        await engine.dispose()

    asyncio.run(run())
    print("schema is at head")


if __name__ == "__main__":
    main()
