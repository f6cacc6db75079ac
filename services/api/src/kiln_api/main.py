"""Composition root: `kiln-api` runs the API with uvicorn (one worker; scale with processes)."""

from __future__ import annotations

import uvicorn
from kiln_observability import setup_logging
from kiln_observability.logs import resolve_level

from .app import create_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    setup_logging("api", settings.log_level)
    # log_config=None: uvicorn's lines go through the root logger too (text or JSON, secrets redacted)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1,
                log_level=resolve_level(settings.log_level).lower(), log_config=None)


if __name__ == "__main__":
    main()
