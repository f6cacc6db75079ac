"""What every command shares: the client built from the config, output (text or ``--json``), failing cleanly."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console

from .. import config
from ..client import Kiln
from ..errors import KilnError
from . import exitcodes

# No markup, emoji or highlighting: job names and log lines are printed exactly as they are.
out = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)

JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text (for scripts).")


def fail(message: str, code: int = exitcodes.ERROR) -> NoReturn:
    err.print(f"kiln: {message}")
    raise typer.Exit(code)


def explain(exc: KilnError) -> str:
    """A refusal in words, with what to do when it is about the key."""
    if exc.status == 401:
        return (f"the API refused the key ({exc.message}); run `kiln login URL` again, or set KILN_API_KEY")
    if exc.status == 403:
        return f"not allowed: {exc.message}"
    return str(exc)


def client() -> Kiln:
    """The API of ``KILN_URL`` / ``KILN_API_KEY``, else of the config file ``kiln login`` wrote."""
    path = config.config_path()
    if config.loose_mode(path):
        err.print(f"kiln: warning: {path} is readable by others; `chmod 600 {path}` (it holds your API key)")
    try:
        creds = config.resolve()
    except ValueError as exc:
        fail(str(exc))
    if creds is None:
        fail("not logged in: run `kiln login URL`, or set KILN_URL and KILN_API_KEY")
    if not creds.api_key:
        fail(f"no API key for {creds.url}: run `kiln login {creds.url}`, or set KILN_API_KEY")
    return Kiln(creds.url, creds.api_key)


def jsonable(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, (list, tuple)):
        return [jsonable(d) for d in data]
    if isinstance(data, dict):
        return {k: jsonable(v) for k, v in data.items()}
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(data), indent=2, default=str) + "\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows in aligned columns (plain text: stable for ``grep`` and ``awk``).

    >>> print(table(["ID", "STATUS"], [["j-1", "running"], ["j-22", "completed"]]))
    ID    STATUS
    j-1   running
    j-22  completed
    """
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
