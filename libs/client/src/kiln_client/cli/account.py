"""Account commands: login, logout, me, projects. The key is read from a hidden prompt or stdin, never argv."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from .. import config
from ..client import Kiln
from ..errors import KilnError
from . import exitcodes
from .common import JsonOpt, client, err, explain, fail, out, print_json, table


def read_key() -> str:
    """The API key: a hidden prompt in a terminal, else the first line of stdin (``kiln login URL < key-file``)."""
    if sys.stdin.isatty():
        key = str(typer.prompt("API key", hide_input=True, err=True))
    else:
        key = sys.stdin.readline()
    return key.strip()


def login(url: Annotated[str, typer.Argument(help="The Kiln API, e.g. https://kiln.example or "
                                                   "http://127.0.0.1:8000.", show_default=False)],
          as_json: bool = JsonOpt) -> None:
    """Save the API and your key for the other commands (checked with the API first).

    The key is asked with a hidden prompt, or read from stdin: `kiln login URL < ~/kiln.key`. It is stored in
    $XDG_CONFIG_HOME/kiln/config.toml (~/.config/kiln/config.toml), readable only by you.
    """
    base = config.base_url(url)
    key = read_key()
    if not key:
        fail("no API key given (type it at the prompt, or pipe it on stdin)", exitcodes.USAGE)
    try:
        with Kiln(base, key) as kiln:
            me = kiln.me()
    except KilnError as exc:
        fail(f"login to {base} failed: {explain(exc)}")
    path = config.config_path()
    config.save(path, config.Credentials(base, key))
    if as_json:
        print_json({"url": base, "config": str(path), "user": me})
        return
    role = "owner" if me.is_owner else ", ".join(f"{p}: {r}" for p, r in sorted(me.roles.items())) or "no projects"
    out.print(f"logged in to {base} as {me.name} ({role}) with key {me.credential}; saved in {path}")
    if os.environ.get(config.URL_ENV) or os.environ.get(config.KEY_ENV):
        err.print("kiln: note: KILN_URL / KILN_API_KEY are set and override the saved login")


def logout() -> None:
    """Forget the saved API and key (the key itself stays valid: revoke it on the API)."""
    path = config.config_path()
    try:
        path.unlink()
    except FileNotFoundError:
        out.print(f"not logged in ({path} does not exist)")
        return
    out.print(f"removed {path}")


def me(as_json: bool = JsonOpt) -> None:
    """Who your key belongs to, and your role in each project."""
    with client() as kiln:
        who = kiln.me()
    if as_json:
        print_json(who)
        return
    out.print(f"{who.name} ({'owner' if who.is_owner else 'user'} {who.id}) via {who.via} {who.credential} "
              f"on {kiln.url}")
    if who.roles:
        out.print(table(["PROJECT", "ROLE"], sorted(who.roles.items())))


def projects(as_json: bool = JsonOpt) -> None:
    """The projects you belong to, with your role."""
    with client() as kiln:
        found = kiln.projects()
    if as_json:
        print_json(found)
    elif found:
        out.print(table(["PROJECT", "ROLE", "DESCRIPTION"], [[p.id, p.role, p.description] for p in found]))


def register(app: typer.Typer) -> None:
    for fn in (login, logout, me, projects):
        app.command()(fn)
