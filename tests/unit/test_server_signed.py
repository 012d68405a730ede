"""Signed URLs of the server: one file of one sandbox, up or down, without the API key,
until they expire. A real ``novasandbox serve`` subprocess on the in-process provider
(the "guest" is this host), real HTTP without any Authorization header."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from novasandbox.records import sandboxes_dir
from novasandbox.server.signed import MAX_EXPIRES, secret_path
from tests.server_support import Server, cli, error_of, make_key

INPROCESS = {"NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}


class Setup:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.files = root / "files"
        self.files.mkdir()
        self.alice_key = make_key(self.state, "alice")
        self.bob_key = make_key(self.state, "bob")
        env = {**os.environ, **INPROCESS}
        env.pop("NOVASANDBOX_STATE_DIR", None)
        self.server = Server(self.state, env=env)
        self.alice = self.server.client(self.alice_key)
        self.bob = self.server.client(self.bob_key)
        self.anon = self.server.client()
        r = self.alice.post("/v1/sandboxes", json={"timeout": 120})
        assert r.status_code == 201, r.text
        self.sid = r.json()["id"]

    def url(self, kind: str, path: str, client: httpx.Client | None = None, **q: Any) -> Any:
        return (client or self.alice).post(
            f"/v1/sandboxes/{self.sid}/files/{kind}-url", params={"path": path, **q}
        )

    def close(self) -> None:
        try:
            for c in (self.alice, self.bob, self.anon):
                c.close()
        finally:
            self.server.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("signed"))
    try:
        yield s
    finally:
        s.close()
    base = sandboxes_dir(s.state)
    assert not base.is_dir() or list(base.iterdir()) == []


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


def test_upload_and_download_without_the_key(setup: Setup) -> None:
    path = str(setup.files / "signed.bin")
    r = setup.url("upload", path, expires=60)
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["method"] == "PUT" and up["path"] == path
    assert up["url"].startswith(f"{setup.server.url}/v1/signed/sandboxes/{setup.sid}/files?")
    assert time.time() < up["expires_at"] <= time.time() + 61
    blob = os.urandom(3 * 1024 * 1024 + 5)
    r = httpx.put(up["url"], content=blob, timeout=60)  # no Authorization header at all
    assert r.status_code == 200, r.text
    assert (r.json()["path"], r.json()["size"]) == (path, len(blob))
    assert Path(path).read_bytes() == blob

    down = setup.url("download", path).json()
    assert down["method"] == "GET"
    r = httpx.get(down["url"], timeout=60)
    assert r.status_code == 200 and r.content == blob
    assert r.headers["content-type"] == "application/octet-stream"
    # any web page may use it: a browser's preflight and the answer's header say so
    assert r.headers["access-control-allow-origin"] == "*"
    r = httpx.options(up["url"], headers={"origin": "https://x.example"})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-methods"] == "GET, PUT"
    r = setup.alice.get(f"/v1/sandboxes/{setup.sid}/files", params={"path": path})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # relative paths are the guest's home, as in the API
    assert setup.url("download", "x.txt").json()["path"] == "/root/x.txt"

    # the signature, a credential while it lives, is not in the server's log
    log = setup.server.log()
    sig = parse_qs(urlsplit(up["url"]).query)["signature"][0]
    assert sig not in log and parse_qs(urlsplit(down["url"]).query)["signature"][0] not in log
    assert "signature=-" in log
    mode = stat.S_IMODE(secret_path(setup.state).stat().st_mode)
    assert mode == 0o600


def test_a_url_is_for_one_method_sandbox_and_path(setup: Setup) -> None:
    path = str(setup.files / "one.txt")
    Path(path).write_text("one")
    other = setup.files / "other.txt"
    other.write_text("other")
    down = setup.url("download", path).json()["url"]
    up = setup.url("upload", path).json()["url"]
    for url, method in [
        (with_query(down, path=str(other)), "GET"),  # another file
        (with_query(down, expires=str(int(time.time()) + 3000)), "GET"),  # longer
        (with_query(down, owner="key_00000000"), "GET"),
        (with_query(down, signature="0" * 64), "GET"),
        (down.replace(setup.sid, "sb-0000000000"), "GET"),  # another sandbox
        (up, "GET"),  # the upload URL, used to read
        (down, "PUT"),  # the download URL, used to write
    ]:
        r = httpx.request(method, url, content=b"evil" if method == "PUT" else None)
        assert r.status_code == 403, (url, method, r.text)
        assert error_of(r)["code"] == "signature-invalid"
        assert r.headers["access-control-allow-origin"] == "*"  # a page may read why
    assert other.read_text() == "other" and Path(path).read_text() == "one"
    # a method the signed path does not have at all
    r = httpx.delete(down)
    assert r.status_code == 405 and error_of(r)["code"] == "method-not-allowed"
    assert Path(path).exists()
    # the signed prefix serves files only: anything else there needs the key
    r = httpx.get(f"{setup.server.url}/v1/signed/sandboxes/{setup.sid}")
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    # the key is needed to sign
    r = setup.url("download", path, client=setup.anon)
    assert r.status_code == 401


def test_an_expired_url_is_refused(setup: Setup) -> None:
    path = str(setup.files / "soon.txt")
    Path(path).write_text("soon")
    made = setup.url("download", path, expires=1).json()
    while time.time() < made["expires_at"]:
        time.sleep(0.1)
    r = httpx.get(made["url"])
    assert r.status_code == 403 and error_of(r)["code"] == "signed-url-expired"


@pytest.mark.parametrize("expires", [0, -5, MAX_EXPIRES + 1])
def test_expiry_is_bounded(setup: Setup, expires: int) -> None:
    r = setup.url("upload", str(setup.files / "never"), expires=expires)
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"
    assert "expires must be 1 to 3600" in error_of(r)["message"]


def test_only_the_owner_gets_urls_and_a_removed_key_revokes_them(setup: Setup) -> None:
    path = str(setup.files / "mine.txt")
    Path(path).write_text("mine")
    r = setup.url("download", path, client=setup.bob)
    assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found"
    r = setup.url("download", "/a/../etc/passwd")
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"

    carol_key = make_key(setup.state, "carol")
    with setup.server.client(carol_key) as carol:
        made = carol.post("/v1/sandboxes", json={"timeout": 120})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        url = carol.post(f"/v1/sandboxes/{sid}/files/download-url", params={"path": path}).json()[
            "url"
        ]
        assert httpx.get(url).content == b"mine"
        done = cli("keys", "rm", "carol", "--state-dir", str(setup.state))
        assert done.returncode == 0, done.stderr
        r = httpx.get(url)
        assert r.status_code == 403 and error_of(r)["code"] == "signature-invalid"
    assert setup.alice.get(f"/v1/sandboxes/{sid}").status_code == 404
    # (carol's sandbox is killed with the server at the end of the module)
