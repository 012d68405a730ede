"""Bad input to the server, on real VMs: oversized bodies and uploads, guest paths outside
the rules, unknown fields and wrong types. Each gets a 4xx with its error code, and
changes nothing: no sandbox made (none listed, no state directory, no VM), no file
written, no command run, no lifetime changed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from novasandbox.records import sandboxes_dir
from tests.server_support import Server, error_of, make_key, stream_events

from .conftest import qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers

pytestmark = pytest.mark.integration

MIB = 1 << 20


class OneSandbox:
    """A server (uploads bounded to 1 MiB) with one sandbox, the only one there may be."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsb-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        key = make_key(self.root, "k")
        self.server = Server(self.root, "--max-file-mib", "1", log=Path(f"{self.root}.log"))
        self.c = self.server.client(key)
        r = self.c.post("/v1/sandboxes", json={"timeout": 600})
        assert r.status_code == 201, r.text
        self.sandbox: dict[str, Any] = r.json()
        self.sid = self.sandbox["id"]

    def run(self, cmd: str) -> tuple[int, str]:
        events = stream_events(self.c, self.sid, cmd=cmd)
        out = "".join(e["data"] for e in events if e["type"] == "stdout")
        return events[-1]["exit_code"], out

    def unchanged(self) -> None:
        """Still exactly the one sandbox, running, with its lifetime."""
        listed = self.c.get("/v1/sandboxes").json()["sandboxes"]
        assert [s["id"] for s in listed] == [self.sid]
        assert listed[0]["state"] == "running"
        assert listed[0]["expires_at"] == self.sandbox["expires_at"]
        assert self.ids.all() == [self.sid]
        assert sorted(p.name for p in sandboxes_dir(self.root).iterdir()) == [self.sid]
        assert len(qemu_processes_under(self.root)) == 1

    def close(self) -> None:
        try:
            self.c.close()
            assert self.server.stop() == 0
            assert qemu_processes_under(self.root) == []
            check_no_leftovers(self.root, self.ids.all())
        finally:
            self.server.close()
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            Path(f"{self.root}.log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def one() -> Iterator[OneSandbox]:
    s = OneSandbox()
    try:
        yield s
    finally:
        s.close()


def expect(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["code"] == code, error
    return error["message"]


def test_oversized_json_bodies_are_413_and_create_or_run_nothing(one: OneSandbox) -> None:
    big = "x" * (16 * MIB + 1)
    r = one.c.post("/v1/sandboxes", json={"labels": {"a": "b"}, "env": {"BIG": big}})
    assert "request body is over" in expect(r, 413, "invalid-config")

    def chunked() -> Iterator[bytes]:  # no Content-Length: bounded as it arrives
        yield b'{"cmd": "touch /tmp/ran", "stdin": "'
        for _ in range(17):
            yield b"y" * MIB
        yield b'"}'

    r = one.c.post(
        f"/v1/sandboxes/{one.sid}/commands",
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    expect(r, 413, "invalid-config")
    assert one.run("test -e /tmp/ran") == (1, "")
    one.unchanged()


def test_oversized_uploads_are_413_and_write_nothing(one: OneSandbox) -> None:
    files = f"/v1/sandboxes/{one.sid}/files"
    r = one.c.put(files, params={"path": "/tmp/big"}, content=b"x" * (MIB + 1))
    expect(r, 413, "file-too-large")

    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield b"y" * (MIB // 2)

    r = one.c.put(files, params={"path": "/tmp/big"}, content=chunks())
    expect(r, 413, "file-too-large")
    assert one.run("ls /tmp/big 2>/dev/null; true") == (0, "")
    # a file the guest made over the bound does not come out either
    assert one.run(f"head -c {MIB + 1} /dev/zero > /tmp/huge")[0] == 0
    r = one.c.get(files, params={"path": "/tmp/huge"})
    expect(r, 413, "file-too-large")
    assert one.run("rm /tmp/huge")[0] == 0
    one.unchanged()


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("../etc/passwd", "'..' components"),
        ("/tmp/../etc/shadow", "'..' components"),
        ("/tmp/a\0b", "NUL"),
        ("", "non-empty"),
    ],
)
def test_paths_outside_the_guest_rules_are_422_for_every_file_route(
    one: OneSandbox, path: str, words: str
) -> None:
    files = f"/v1/sandboxes/{one.sid}/files"
    for method, route, kw in [
        ("PUT", files, {"content": b"data"}),
        ("GET", files, {}),
        ("DELETE", files, {}),
        ("GET", f"{files}/list", {}),
        ("GET", f"{files}/stat", {}),
        ("GET", f"{files}/exists", {}),
        ("POST", f"{files}/mkdir", {}),
    ]:
        r = one.c.request(method, route, params={"path": path}, **kw)
        assert words in expect(r, 422, "invalid-config"), (method, route)
    assert one.run("test -e /etc/passwd && ! test -e /tmp/a")[0] == 0
    one.unchanged()


@pytest.mark.parametrize(
    ("route", "body", "words"),
    [
        ("", {"template": "python", "vcpu": 2}, "Extra inputs are not permitted"),
        ("", {"vcpus": "2"}, "valid integer"),
        ("", {"labels": {"bad key!": "x"}}, "label key"),
        ("", {"env": {"A": 1}}, "valid string"),
        ("/commands", {"cmd": "touch /tmp/ran", "shell": True}, "Extra inputs"),
        ("/commands", {"cmd": "touch /tmp/ran", "timeout": "5"}, "valid number"),
        ("/commands", {"cmd": "touch /tmp/ran", "cwd": "../x"}, "'..' components"),
        ("/timeout", {"timeout": 5, "when": "now"}, "Extra inputs"),
        ("/timeout", {"seconds": 5}, "Field required"),
    ],
)
def test_unknown_fields_and_wrong_types_are_422_and_change_nothing(
    one: OneSandbox, route: str, body: dict[str, Any], words: str
) -> None:
    base = "/v1/sandboxes" + (f"/{one.sid}" if route else "")
    method = "PUT" if route == "/timeout" else "POST"
    r = one.c.request(method, base + route, json=body)
    assert words in expect(r, 422, "invalid-config")
    assert one.run("test -e /tmp/ran") == (1, "")
    one.unchanged()


def test_a_body_that_is_not_json_is_400(one: OneSandbox) -> None:
    r = one.c.post(
        "/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}
    )
    expect(r, 400, "invalid-config")
    one.unchanged()
