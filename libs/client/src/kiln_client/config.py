"""Where the ``kiln`` command finds its API and key: ``KILN_URL`` / ``KILN_API_KEY``, else the config file.

The file is ``$XDG_CONFIG_HOME/kiln/config.toml`` (``~/.config/kiln/config.toml``), mode 0600 in a 0700 folder,
written by ``kiln login``:

    url = "https://kiln.example"
    api_key = "kiln_..."
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

URL_ENV, KEY_ENV = "KILN_URL", "KILN_API_KEY"


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str = ""

    def __repr__(self) -> str:  # never the key
        return f"Credentials(url={self.url!r}, api_key={'***' if self.api_key else ''!r})"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The config file, honouring ``XDG_CONFIG_HOME``.

    >>> str(config_path({"XDG_CONFIG_HOME": "/tmp/x", "HOME": "/home/ada"}))
    '/tmp/x/kiln/config.toml'
    >>> str(config_path({"HOME": "/home/ada"}))
    '/home/ada/.config/kiln/config.toml'
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "kiln" / "config.toml"


def base_url(url: str) -> str:
    """The API's root URL as given to ``kiln login``: a trailing ``/`` or ``/api/v1`` dropped, and without a scheme
    https (http for this machine).

    >>> base_url("http://127.0.0.1:8000/api/v1/"), base_url("kiln.example"), base_url("localhost:8000")
    ('http://127.0.0.1:8000', 'https://kiln.example', 'http://localhost:8000')
    """
    url = url.strip().rstrip("/").removesuffix("/api/v1")
    if "://" not in url:
        local = url.split("/")[0].rsplit(":", 1)[0] in ("localhost", "127.0.0.1", "[::1]")
        url = ("http://" if local else "https://") + url
    return url


def load(path: Path) -> dict[str, str]:
    """The file's settings; none when it does not exist."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None
    return {k: v for k, v in data.items() if isinstance(v, str)}


def save(path: Path, creds: Credentials) -> None:
    """Write ``creds`` readable by this user only (the folder 0700, the file 0600, also when it existed)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(creds))
    os.replace(tmp, path)


def render(creds: Credentials) -> str:
    """TOML text of ``creds`` (JSON string escapes are valid TOML basic strings).

    >>> print(render(Credentials("http://h:8000", "kiln_x")), end="")
    url = "http://h:8000"
    api_key = "kiln_x"
    """
    return f"url = {json.dumps(creds.url)}\napi_key = {json.dumps(creds.api_key)}\n"


def resolve(env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials to use: each of ``KILN_URL`` and ``KILN_API_KEY`` overrides the file's; None without a URL.

    >>> resolve({"KILN_URL": "http://h:1", "KILN_API_KEY": "k", "HOME": "/nonexistent"})
    Credentials(url='http://h:1', api_key='***')
    """
    env = os.environ if env is None else env
    saved = load(config_path(env))
    url = env.get(URL_ENV) or saved.get("url")
    if not url:
        return None
    return Credentials(base_url(url), env.get(KEY_ENV) or saved.get("api_key", ""))


def loose_mode(path: Path) -> bool:
    """Whether others than its owner may read or write the file (a key there is then no longer private)."""
    try:
        return bool(path.stat().st_mode & 0o077)
    except FileNotFoundError:
        return False
