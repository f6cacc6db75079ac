"""Artifact downloads: written beside the target and renamed into place only once the SHA-256 the API gave matches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import KilnError
from .models import Artifact

CHECKSUM_HEADER = "X-Kiln-Sha256"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Downloaded:
    """A downloaded artifact: where, how big, its SHA-256, and whether that matched what the API recorded."""

    path: Path
    size: int
    sha256: str
    verified: bool


def pick(artifacts: Sequence[Artifact], name: str, epoch: int | None = None) -> Artifact | None:
    """The artifact the API serves for ``name`` (and ``epoch``): the newest stored version.

    >>> from datetime import datetime
    >>> arts = [Artifact(name="best.pt", uri="a", size=1, sha256="1" * 64, epoch=1),
    ...         Artifact(name="best.pt", uri="b", size=1, sha256="2" * 64, epoch=2)]
    >>> pick(arts, "best.pt").uri, pick(arts, "best.pt", epoch=1).uri, pick(arts, "last.pt")
    ('b', 'a', None)
    """
    found = [a for a in artifacts if a.name == name and (epoch is None or a.epoch == epoch)]
    return found[-1] if found else None


def target(dest: str | os.PathLike[str], name: str) -> Path:
    """Where ``name`` goes: into ``dest`` when it is a folder (made if missing), else ``dest`` itself as the file.

    >>> target("/tmp", "best.pt").name, target("/tmp/model.pt", "best.pt").name
    ('best.pt', 'model.pt')
    """
    path = Path(dest)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        return path / Path(name).name  # the API's name never climbs out of dest
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Receiver:
    """Writes chunks to ``<path>.part`` while hashing them; :meth:`finish` checks and renames, :meth:`abort` removes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.hash = hashlib.sha256()
        self.size = 0
        self.file = open(self.part, "wb")  # noqa: SIM115 - closed by finish() or abort()

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def finish(self, expected: str | None) -> Downloaded:
        self.file.close()
        got = self.hash.hexdigest()
        if expected and got != expected.lower():
            self.part.unlink(missing_ok=True)
            raise KilnError(None, f"checksum mismatch for {self.path.name}: the API recorded sha256 {expected}, "
                                  f"the download has {got} ({self.size} bytes); nothing was kept")
        os.replace(self.part, self.path)
        return Downloaded(self.path, self.size, got, verified=bool(expected))

    def abort(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)
