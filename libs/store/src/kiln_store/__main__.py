"""`python -m kiln_store upgrade URL`: apply the Alembic migrations to a database."""

import asyncio
import sys

from .db import make_engine, upgrade


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "upgrade":
        sys.exit("usage: python -m kiln_store upgrade DATABASE_URL")

    async def run() -> None:
        engine = make_engine(sys.argv[2])
        await upgrade(engine)
        await engine.dispose()

    asyncio.run(run())
    print("schema is at head")


if __name__ == "__main__":
    main()
