"""supervisord's configuration for ``kiln up``: one ``[program]`` per service, as text (no I/O here).

supervisord does the supervising: it restarts a service that crashes, backs off (1 s, 2 s, 3 s, ...) when one
keeps failing at start and gives it up (FATAL) after ``START_RETRIES``, and on SIGTERM stops the ``kiln`` group
all at once, then the bundled nats-server.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

GROUP = "kiln"
USER = "kiln"  # of the control socket; the password is new on every start
START_SECS = 5  # a start counts as good once the process has stayed up this long (a failed start: 1-3 s)
START_RETRIES = 5  # quick failures in a row before a program is given up (FATAL)
STOP_WAIT_S = 5  # SIGTERM, then SIGKILL to the program's process group after this long
RUNNER_SHUTDOWN_GRACE_S = 2  # one machine: no other runner takes the job now, so stop it soon with its checkpoint
RUNNER_STOP_WAIT_S = RUNNER_SHUTDOWN_GRACE_S + 20 + 5 + 10 + 5
"""A stopping runner's drain: the grace above, then what the runner itself waits for its stopping jobs (their cancel
grace, 20 s, SIGTERM then SIGKILL, 5 s, and 10 s to report), and a margin; only then does supervisord kill it (so its
job is handed back, not lost)."""
NATS_PRIORITY, GROUP_PRIORITY = 10, 100  # started low first, stopped high first: NATS outlives the services

_INLINE_COMMENT = re.compile(r"\s[;#]")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_QUOTES = ("'", '"')


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_wait_s: int = STOP_WAIT_S


def ini_value(value: str, what: str) -> str:
    """``value`` written so that supervisord reads it back unchanged: it expands ``%(name)s`` in every value.

    >>> ini_value("sqlite:///var/50%.db", "db")
    'sqlite:///var/50%%.db'
    """
    if "\n" in value or "\r" in value or _INLINE_COMMENT.search(value) or value != value.strip():
        raise ValueError(f"{what}={value!r} cannot go into supervisord.conf: a line break, spaces at either end, "
                         "or ';'/'#' after a space (the start of an ini comment)")
    return value.replace("%", "%%")


def path_value(path: Path, what: str) -> str:
    """A file or folder for supervisord.conf; ``%`` is refused (it expands log file names twice)."""
    if "%" in str(path):
        raise ValueError(f"{what} {str(path)!r}: supervisord cannot take a path with '%'; choose another data dir")
    return ini_value(str(path), what)


def env_value(env: dict[str, str]) -> str:
    """A program's ``environment=``: supervisord splits it with non-POSIX shlex, so each value is quoted whole.

    >>> print(env_value({"A": "x, y", "B": '["a", "b"]', "C": "100%"}))
    A="x, y",B='["a", "b"]',C="100%%"
    """
    parts = []
    for key, value in env.items():
        quote = '"' if '"' not in value else "'"
        if not _ENV_KEY.match(key) or quote in value or value.startswith(_QUOTES) or value.endswith(_QUOTES):
            raise ValueError(f"{key}={value!r} cannot go into supervisord.conf: both kinds of quote, or a quote "
                             "at either end; pass it through StackConfig.extra_env instead")
        parts.append(f"{key}={quote}{value}{quote}")
    return ini_value(",".join(parts), "environment")


def _command(argv: list[str]) -> str:  # supervisord splits it with shlex.split
    return ini_value(shlex.join(argv), "command")


def _program(p: Program, *, cwd: Path, logs: Path, autostart: bool, priority: int | None = None) -> list[str]:
    lines = [f"[program:{p.name}]", f"command={_command(p.argv)}", f"directory={path_value(cwd, 'directory')}"]
    if p.env:
        lines.append(f"environment={env_value(p.env)}")
    if priority is not None:
        lines.append(f"priority={priority}")
    return lines + [
        f"autostart={str(autostart).lower()}", "autorestart=true",
        f"startsecs={START_SECS}", f"startretries={START_RETRIES}",
        "stopsignal=TERM", f"stopwaitsecs={p.stop_wait_s}", "stopasgroup=true", "killasgroup=true",
        "redirect_stderr=true", f"stdout_logfile={path_value(logs / (p.name + '.log'), 'log file')}", ""]


def render(services: list[Program], *, nats: Program | None, data_dir: Path, socket: Path, password: str,
           root: bool) -> str:
    """The whole ``supervisord.conf`` (mode 0600: it holds the socket's password); the ``kiln`` group is started
    on request, once NATS listens."""
    logs = data_dir / "logs"
    lines = ["; written by kiln up on every start: edits are lost", "[supervisord]",
             f"logfile={path_value(logs / 'supervisord.log', 'log file')}",
             f"pidfile={path_value(data_dir / 'supervisord.pid', 'pid file')}",
             f"childlogdir={path_value(logs, 'log dir')}", "loglevel=info", "nodaemon=true"]
    if root:
        lines.append("user=0")  # already root: says so, instead of a CRIT line about privileges not dropped
    auth = [f"username={USER}", f"password={ini_value(password, 'password')}"]
    lines += ["", "[unix_http_server]", f"file={path_value(socket, 'socket')}", "chmod=0700", *auth, "",
              "[rpcinterface:supervisor]",
              "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
              "[supervisorctl]", f"serverurl=unix://{path_value(socket, 'socket')}", *auth, ""]
    if nats is not None:
        lines += _program(nats, cwd=data_dir, logs=logs, autostart=True, priority=NATS_PRIORITY)
    for p in services:
        lines += _program(p, cwd=data_dir, logs=logs, autostart=False)
    lines += [f"[group:{GROUP}]", "programs=" + ",".join(p.name for p in services), f"priority={GROUP_PRIORITY}", ""]
    return "\n".join(lines)
