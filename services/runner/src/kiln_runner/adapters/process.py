"""The trainer subprocess: own process group, parent-death signal, output pumped line by line."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
from collections.abc import Callable

_SPLIT = re.compile(rb"[\r\n]+")
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child before exec: new session (own process group) and die with the runner."""
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


async def spawn(argv: list[str], env: dict[str, str], cwd: str, uid: int | None = None) -> asyncio.subprocess.Process:
    """Start the trainer; with ``uid`` as that user and group, without the runner's supplementary groups."""
    user = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    return await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=_child_setup, **user,
    )


async def pump(stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
    """Split output on newlines and carriage returns (progress bars) and hand each non-empty line over."""
    buf = b""
    while chunk := await stream.read(65536):
        parts = _SPLIT.split(buf + chunk)
        buf = parts.pop()
        for p in parts:
            if p.strip():
                on_line(p.decode("utf-8", "replace").rstrip())
    if buf.strip():
        on_line(buf.decode("utf-8", "replace").rstrip())


def signal_group(pid: int, sig: int) -> bool:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
        return True
    return False


async def stop_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the trainer's whole process group, SIGKILL it after ``grace_s``."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    signal_group(proc.pid, signal.SIGKILL)  # leftovers (dataloader workers) of the group
