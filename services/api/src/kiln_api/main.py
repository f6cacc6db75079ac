"""Composition root: `kiln-api` runs the API with uvicorn (one worker; scale with processes)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1, log_level="info")


if __name__ == "__main__":
    main()
