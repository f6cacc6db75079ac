"""The ``kiln`` command: submit, follow and fetch trainings on a Kiln API from anywhere (docs/cli.md).

Other installed packages add commands through the entry-point group ``kiln.cli`` (a callable taking the typer app):
kiln-local adds ``kiln up`` and ``kiln demo``. Without them this package alone is the whole remote client.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import typer

from ..errors import KilnError
from ..live import WatchTimeout
from . import account, exitcodes, jobs
from .common import err, explain

PLUGINS = "kiln.cli"

app = typer.Typer(
    name="kiln", no_args_is_help=True, add_completion=True,
    help="Kiln: train YOLO models on your Kiln from anywhere. Start with `kiln login URL`.",
    # Never print a traceback's local variables: one of them may hold the API key.
    pretty_exceptions_show_locals=False, rich_markup_mode=None,
)
account.register(app)
jobs.register(app)


def load_plugins(target: typer.Typer = app) -> None:
    """Add the commands of every installed ``kiln.cli`` entry point; one that fails to load is named, not fatal."""
    for ep in entry_points(group=PLUGINS):
        try:
            ep.load()(target)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the remote commands down
            err.print(f"kiln: warning: the commands of {ep.value} are not available: {exc}")


def main(argv: list[str] | None = None) -> int:
    """Run ``kiln``; the exit code is one of :mod:`kiln_client.cli.exitcodes`."""
    load_plugins()
    try:
        app(args=argv, prog_name="kiln")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else exitcodes.ERROR)
    except KilnError as exc:
        err.print(f"kiln: {explain(exc)}")
        return exitcodes.ERROR
    except WatchTimeout:
        err.print("kiln: --timeout passed before the job ended")
        return exitcodes.TIMEOUT
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
