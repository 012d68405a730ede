"""The HTTP server on real VMs: ``novasandbox serve`` as a subprocess on a free loopback
port with a private state directory, keys made by the CLI, real HTTP (httpx).

Every server is stopped at teardown (SIGTERM, then SIGKILL), whatever happened, and then
nothing of its sandboxes may be left: no QEMU process, no state, no host resource (judged
by the ids of every sandbox made under its state directory, learnt by inotify).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox.gc import kill_sandbox
from novasandbox.records import list_sandboxes, sandboxes_dir
from tests.server_support import Server, error_of, iter_wait, make_key, stream_events

from .conftest import qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers

pytestmark = pytest.mark.integration


class Served:
    """A server with its own short state directory (unix socket paths stay short)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nss-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        self.alice_key = make_key(self.root, "alice")
        self.bob_key = make_key(self.root, "bob")
        self.server = Server(self.root, log=Path(f"{self.root}.log"))
        self.alice = self.server.client(self.alice_key)
        self.bob = self.server.client(self.bob_key)

    def made(self) -> list[str]:
        return self.ids.all()

    def entries(self) -> list[str]:
        base = sandboxes_dir(self.root)
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def close(self) -> None:
        try:
            self.alice.close()
            self.bob.close()
            self.server.close()
            left = qemu_processes_under(self.root)
            for info in list_sandboxes(self.root):  # what a failed stop left: clean, then fail
                kill_sandbox(info.id, self.root)
            assert left == [], f"QEMU processes outlived the server: {left}"
            assert self.entries() == []
            check_no_leftovers(self.root, self.made())
        finally:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            Path(f"{self.root}.log").unlink(missing_ok=True)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.close()


def test_create_run_files_list_isolation_and_kill(served: Served) -> None:
    c = served.alice
    r = c.post("/v1/sandboxes", json={"template": "python", "labels": {"job": "it"}})
    assert r.status_code == 201, r.text
    sb = r.json()
    sid = sb["id"]
    assert sb["state"] == "running" and sb["provider"] == "qemu" and sb["restored"] is True

    events = stream_events(c, sid, cmd="echo hi")
    assert events[0]["type"] == "started" and events[0]["pid"] > 1
    assert [e for e in events if e["type"] == "stdout"] == [{"type": "stdout", "data": "hi\n"}]
    assert events[-1] == {**events[-1], "type": "exit", "exit_code": 0, "timed_out": False}
    events = stream_events(c, sid, cmd=["python3", "-c", "import sys; sys.exit(3)"])
    assert events[-1]["exit_code"] == 3

    for name, blob in [("small.txt", b"hello\n"), ("big.bin", os.urandom(5 * 1024 * 1024 + 3))]:
        path = f"/tmp/{name}"
        r = c.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=blob)
        assert r.status_code == 200, r.text
        written = r.json()
        assert (written["path"], written["size"]) == (path, len(blob))
        assert (written["entry"]["path"], written["entry"]["owner"]) == (path, "user")
        got = c.get(f"/v1/sandboxes/{sid}/files", params={"path": path})
        assert got.status_code == 200 and got.content == blob
    events = stream_events(c, sid, cmd="sha256sum /tmp/big.bin | cut -c1-64")
    digest = hashlib.sha256(got.content).hexdigest()
    assert "".join(e["data"] for e in events if e["type"] == "stdout").strip() == digest

    listed = c.get("/v1/sandboxes").json()["sandboxes"]
    assert [s["id"] for s in listed] == [sid]
    assert c.get("/v1/sandboxes", params={"label": "job=it"}).json()["sandboxes"][0]["id"] == sid

    # another key: not found, not listed, cannot touch it
    assert served.bob.get("/v1/sandboxes").json() == {"sandboxes": []}
    for method, path, kw in [
        ("GET", f"/v1/sandboxes/{sid}", {}),
        ("DELETE", f"/v1/sandboxes/{sid}", {}),
        ("POST", f"/v1/sandboxes/{sid}/commands", {"json": {"cmd": "true"}}),
        ("GET", f"/v1/sandboxes/{sid}/files", {"params": {"path": "/tmp/small.txt"}}),
    ]:
        r = served.bob.request(method, path, **kw)
        assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found", r.text
    assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"

    assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    r = c.get(f"/v1/sandboxes/{sid}")
    assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found"
    assert qemu_processes_under(served.root) == []
    assert served.entries() == []


def test_without_a_valid_key_nothing_happens(served: Served) -> None:
    for headers in ({}, {"Authorization": f"Bearer {served.alice_key}0"}):
        with served.server.client() as anon:
            r = anon.post("/v1/sandboxes", json={}, headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
            r = anon.get("/v1/sandboxes", headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"
    assert served.made() == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"foo": 1}, "Extra inputs are not permitted"),
        ({"vcpus": 0}, "vcpus must be an integer"),
        ({"network": "detached"}, "none, nat, tap"),
    ],
)
def test_bad_input_gets_4xx_and_creates_nothing(
    served: Served, body: dict[str, Any], words: str
) -> None:
    r = served.alice.post("/v1/sandboxes", json=body)
    assert r.status_code == 422, r.text
    error = error_of(r)
    assert error["code"] == "invalid-config" and words in error["message"]
    assert served.made() == []  # not even a state directory for a moment
    assert served.alice.get("/v1/sandboxes").json() == {"sandboxes": []}
    assert qemu_processes_under(served.root) == []


def test_a_client_that_disconnects_gets_its_command_killed(served: Served) -> None:
    c = served.alice
    sid = c.post("/v1/sandboxes", json={}).json()["id"]
    with c.stream(
        "POST",
        f"/v1/sandboxes/{sid}/commands",
        json={"cmd": "echo $$; exec sleep 1000", "timeout": None},
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith('{"type": "started"')
        pid = int(next(lines).split('"data": "')[1].split("\\n")[0])
        alive = stream_events(c, sid, cmd=f"kill -0 {pid} && cat /proc/{pid}/cmdline")
        assert alive[-1]["exit_code"] == 0
        assert "sleep" in "".join(e.get("data", "") for e in alive)
    # the client closed the connection: the command dies in the guest
    for _ in iter_wait("the command to be killed in the guest"):
        events = stream_events(c, sid, cmd=f"test -e /proc/{pid}")
        if events[-1]["exit_code"] != 0:
            break
    assert any(
        e.get("message") == "command killed: its client disconnected" and e.get("sandbox") == sid
        for e in served.server.events()
    )
    assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


def test_sigterm_kills_every_sandbox_and_exits_0(served: Served) -> None:
    c = served.alice
    ids = [c.post("/v1/sandboxes", json={}).json()["id"] for _ in range(2)]
    ids.append(served.bob.post("/v1/sandboxes", json={}).json()["id"])
    assert len(qemu_processes_under(served.root)) == 3
    got: list[dict[str, Any]] = []
    t = threading.Thread(
        target=stream_events,
        args=(c, ids[0], got),
        kwargs={"cmd": "echo go; sleep 1000", "timeout": None},
    )
    t.start()
    for _ in iter_wait("the command to start"):
        if len(got) >= 2:
            break
    assert served.server.stop(signal.SIGTERM) == 0
    t.join(60)
    assert not t.is_alive()
    assert got[-1]["type"] == "error" and got[-1]["error"]["code"] == "sandbox-not-running"
    assert qemu_processes_under(served.root) == []
    assert served.entries() == []
    check_no_leftovers(served.root, ids)
    assert sorted(served.made()) == sorted(ids)


def test_no_host_memory_is_a_503_with_retry_after(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="nss-", dir="/tmp"))
    ids = SandboxIds(root)
    key = make_key(root, "k")
    env = {**os.environ, "NOVASANDBOX_MEMORY_RESERVE_MIB": str(1 << 40)}
    server = Server(root, env=env, log=tmp_path / "server.log")
    try:
        with server.client(key) as c:
            r = c.post("/v1/sandboxes", json={})
            assert r.status_code == 503, r.text
            assert error_of(r)["code"] == "host-memory-exhausted"
            assert int(r.headers["retry-after"]) > 0
            assert c.get("/v1/sandboxes").json() == {"sandboxes": []}
        assert server.stop() == 0
        assert qemu_processes_under(root) == []
        assert sorted(sandboxes_dir(root).iterdir()) == []
        check_no_leftovers(root, ids.all())
    finally:
        server.close()
        ids.close()
        shutil.rmtree(root, ignore_errors=True)
