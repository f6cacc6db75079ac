"""Where `kiln` keeps its login, the one error type, downloads that do not verify, and the modules' doctests."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import stat
from pathlib import Path

import httpx
import pytest
from kiln_client import KilnError
from kiln_client.config import Credentials, config_path, load, resolve, save
from kiln_client.download import Receiver
from kiln_client.errors import from_response

MODULES = ["kiln_client.config", "kiln_client.errors", "kiln_client.live", "kiln_client.download",
           "kiln_client.cli.args", "kiln_client.cli.render", "kiln_client.cli.common", "kiln_client.cli.exitcodes"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_the_login_file_is_private_and_the_environment_overrides_it(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    path = config_path(env)
    path.parent.mkdir(mode=0o755, parents=True)
    path.write_text("old")
    path.chmod(0o644)
    save(path, Credentials("http://h:8000", 'kiln_k"ey\\'))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and load(path) == {"url": "http://h:8000",
                                                                       "api_key": 'kiln_k"ey\\'}
    assert resolve(env) == Credentials("http://h:8000", 'kiln_k"ey\\')
    assert resolve(env | {"KILN_API_KEY": "other"}) == Credentials("http://h:8000", "other")
    assert resolve(env | {"KILN_URL": "kiln.example/api/v1"}).url == "https://kiln.example"
    assert resolve({"HOME": str(tmp_path / "nobody")}) is None
    assert "kiln_k" not in repr(resolve(env))  # never printed by accident
    (tmp_path / "bad.toml").write_text("url = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        load(tmp_path / "bad.toml")


def test_one_error_type_carries_the_status_and_the_apis_detail():
    body = {"detail": [{"loc": ["body", "train", "epochs"], "msg": "Input should be greater than or equal to 1"}]}
    err = from_response(httpx.Response(422, json=body))
    assert (err.status, err.detail) == (422, body["detail"])
    assert str(err) == "422: train.epochs: Input should be greater than or equal to 1"
    plain = from_response(httpx.Response(502, text="<html>Bad gateway</html>"))
    assert plain.status == 502 and "Bad gateway" in plain.message


def test_a_download_that_does_not_match_its_checksum_keeps_nothing(tmp_path: Path):
    rx = Receiver(tmp_path / "best.pt")
    rx.write(b"weights")
    with pytest.raises(KilnError, match="checksum mismatch"):
        rx.finish("0" * 64)
    assert list(tmp_path.iterdir()) == []
    ok = Receiver(tmp_path / "best.pt")
    ok.write(b"weights")
    done = ok.finish(hashlib.sha256(b"weights").hexdigest())
    assert done.verified and done.path.read_bytes() == b"weights" and list(tmp_path.iterdir()) == [done.path]
