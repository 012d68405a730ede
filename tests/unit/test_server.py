"""The HTTP server, fast: a real ``novasandbox serve`` process with the in-process provider
(the real guest agent on this host, no VM), keys made by the real CLI, real HTTP.

It isolates nothing: commands run on this host, so they are harmless and files live in
this test's temporary directory. ``tests/integration/test_server.py`` runs the same API
on real VMs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from novasandbox import errors
from novasandbox.errors import NovaSandboxError
from novasandbox.procfs import pids_matching
from novasandbox.records import sandboxes_dir, vmm_marker
from novasandbox.server.app import ERROR_STATUS, status_of
from novasandbox.server.serve import check_bind, is_loopback
from tests.server_support import Server, cli, error_of, iter_wait, make_key, stream_events

INPROCESS = {"NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}


def server_env() -> dict[str, str]:
    env = {**os.environ, **INPROCESS}
    env.pop("NOVASANDBOX_STATE_DIR", None)
    return env


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.files = root / "files"  # where the "guest" (this host) writes
        self.files.mkdir()
        self.alice_key = make_key(self.state, "alice")
        self.bob_key = make_key(self.state, "bob")
        self.server = Server(self.state, "--log-level", "debug", env=server_env())
        self.alice = self.server.client(self.alice_key)
        self.bob = self.server.client(self.bob_key)

    def entries(self) -> list[str]:
        base = sandboxes_dir(self.state)
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def create(self, client: httpx.Client | None = None, **body: Any) -> dict[str, Any]:
        r = (client or self.alice).post("/v1/sandboxes", json={"timeout": 120, **body})
        assert r.status_code == 201, r.text
        return dict(r.json())

    def close(self) -> None:
        self.server.close()
        self.alice.close()
        self.bob.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("srv"))
    try:
        yield s
    finally:
        s.close()
    assert s.entries() == [], "the server left sandbox state behind"


@pytest.fixture(autouse=True)
def nothing_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test kills what it made (checked through the API)."""
    yield
    if "setup" not in request.fixturenames:
        return
    s: Setup = request.getfixturevalue("setup")
    left = []
    for client in (s.alice, s.bob):
        for sb in client.get("/v1/sandboxes").json()["sandboxes"]:
            if sb["state"] in ("running", "paused", "starting", "broken"):
                left.append(sb["id"])
            client.delete(f"/v1/sandboxes/{sb['id']}")
    assert left == [], "the test left sandboxes running"


# --------------------------------------------------------------------------- keys


def test_healthz_needs_no_key(setup: Setup) -> None:
    r = httpx.get(f"{setup.server.url}/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/sandboxes"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/sb-0000000000"),
        ("DELETE", "/v1/sandboxes/sb-0000000000"),
        ("POST", "/v1/sandboxes/sb-0000000000/commands"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_other_path_needs_a_valid_key(setup: Setup, method: str, path: str) -> None:
    before = setup.entries()
    wrong = setup.alice_key[:-2] + ("xy" if not setup.alice_key.endswith("xy") else "zz")
    for headers in (
        {},
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {setup.alice_key}"},
        {"Authorization": setup.alice_key},
        {"X-Api-Key": setup.alice_key},
    ):
        r = httpx.request(
            method, f"{setup.server.url}{path}", headers=headers, json={"template": "python"}
        )
        assert r.status_code == 401, (headers, r.text)
        assert error_of(r)["code"] == "unauthorized"
        assert "sandbox" not in error_of(r)["message"].lower()
    assert setup.entries() == before


def test_a_key_made_or_removed_while_serving_counts_at_once(setup: Setup) -> None:
    key = make_key(setup.state, "carol")
    with setup.server.client(key) as carol:
        assert carol.get("/v1/sandboxes").status_code == 200
        assert cli("keys", "rm", "carol", "--state-dir", str(setup.state)).returncode == 0
        r = carol.get("/v1/sandboxes")
        assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"


def test_openapi_describes_the_routes(setup: Setup) -> None:
    spec = setup.alice.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/sandboxes",
        "/v1/sandboxes/{sandbox_id}",
        "/v1/sandboxes/{sandbox_id}/commands",
        "/v1/sandboxes/{sandbox_id}/files",
        "/v1/sandboxes/{sandbox_id}/timeout",
    ):
        assert path in paths, path
    create = spec["components"]["schemas"]["CreateSandbox"]
    assert create["additionalProperties"] is False
    assert {"template", "vcpus", "memory_mib", "env", "timeout", "network", "labels"} <= set(
        create["properties"]
    )


# --------------------------------------------------------------------------- the flow


def test_create_run_upload_download_list_and_kill(setup: Setup) -> None:
    sb = setup.create(labels={"job": "flow"})
    sid = sb["id"]
    assert sb["state"] == "running" and sb["labels"] == {"job": "flow"}
    assert sb["provider"] == "inprocess"

    events = stream_events(setup.alice, sid, cmd="echo hi; echo oops >&2", cwd=str(setup.files))
    assert events[0]["type"] == "started" and events[0]["pid"] > 0
    assert {"type": "stdout", "data": "hi\n"} in events
    assert {"type": "stderr", "data": "oops\n"} in events
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
    assert events[-1]["timed_out"] is False

    for size in (0, 11, 5 * 1024 * 1024 + 7):
        blob = os.urandom(size)
        path = str(setup.files / f"up-{size}.bin")
        r = setup.alice.put(f"/v1/sandboxes/{sid}/files", params={"path": path}, content=blob)
        assert r.status_code == 200, r.text
        assert (r.json()["path"], r.json()["size"]) == (path, size)
        assert r.json()["entry"]["path"] == path and r.json()["entry"]["size"] == size
        got = setup.alice.get(f"/v1/sandboxes/{sid}/files", params={"path": path})
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.content == blob

    listed = setup.alice.get("/v1/sandboxes").json()["sandboxes"]
    assert [s["id"] for s in listed] == [sid]
    assert setup.alice.get(f"/v1/sandboxes/{sid}").json()["id"] == sid

    # bob: the sandbox does not exist for him, whatever he tries
    assert setup.bob.get("/v1/sandboxes").json() == {"sandboxes": []}
    nobody = setup.alice.get("/v1/sandboxes/sb-00000000ff")
    for method, path, kw in [
        ("GET", f"/v1/sandboxes/{sid}", {}),
        ("DELETE", f"/v1/sandboxes/{sid}", {}),
        ("POST", f"/v1/sandboxes/{sid}/pause", {}),
        ("PUT", f"/v1/sandboxes/{sid}/timeout", {"json": {"timeout": 5}}),
        ("POST", f"/v1/sandboxes/{sid}/commands", {"json": {"cmd": "true"}}),
        ("GET", f"/v1/sandboxes/{sid}/files", {"params": {"path": "/etc/hostname"}}),
        ("PUT", f"/v1/sandboxes/{sid}/files", {"params": {"path": "/x"}, "content": b"x"}),
        ("GET", f"/v1/sandboxes/{sid}/files/list", {"params": {"path": "/"}}),
    ]:
        r = setup.bob.request(method, path, **kw)
        assert r.status_code == 404, (method, path, r.text)
        assert error_of(r)["code"] == "sandbox-not-found"
        # the same answer as for an id nobody has
        assert error_of(r)["message"].replace(sid, "?") == error_of(nobody)["message"].replace(
            "sb-00000000ff", "?"
        )
    assert setup.alice.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"

    assert setup.alice.delete(f"/v1/sandboxes/{sid}").status_code == 204
    r = setup.alice.get(f"/v1/sandboxes/{sid}")
    assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found"
    assert setup.alice.delete(f"/v1/sandboxes/{sid}").status_code == 404
    assert sid not in setup.entries()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"foo": 1}, 422, "invalid-config", "foo: Extra inputs are not permitted"),
        ({"vcpus": 0}, 422, "invalid-config", "vcpus must be an integer"),
        ({"vcpus": "2"}, 422, "invalid-config", "vcpus"),
        ({"memory_mib": 1}, 422, "invalid-config", "memory"),
        ({"network": "detached"}, 422, "invalid-config", "none, nat, tap"),
        ({"timeout": -1}, 422, "invalid-config", "timeout"),
        ({"env": {"A": 1}}, 422, "invalid-config", "env.A"),
        ({"env": {"A=B": "1"}}, 422, "invalid-config", "A=B"),
        ({"labels": {"no spaces": "x"}}, 422, "invalid-config", "label"),
        ({"labels": {f"k{i}": "v" for i in range(40)}}, 422, "invalid-config", "labels"),
        ({"template": "nope"}, 422, "template-not-found", "nope"),
        ({"allow": ["10.0.0.1"]}, 422, "invalid-config", "allow"),
        ("[1, 2]", 422, "invalid-config", "dictionary"),
        ("{", 400, "invalid-config", "JSON"),
    ],
)
def test_bad_input_is_refused_and_creates_nothing(
    setup: Setup, body: Any, status: int, code: str, words: str
) -> None:
    before = setup.entries()
    if isinstance(body, str):
        r = setup.alice.post(
            "/v1/sandboxes", content=body, headers={"content-type": "application/json"}
        )
    else:
        r = setup.alice.post("/v1/sandboxes", json=body)
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["code"] == code
    assert words in error["message"]
    assert setup.entries() == before
    assert setup.alice.get("/v1/sandboxes").json() == {"sandboxes": []}


def test_json_bodies_are_bounded(setup: Setup) -> None:
    big = json.dumps({"env": {"A": "x" * (17 << 20)}}).encode()
    r = setup.alice.post("/v1/sandboxes", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "invalid-config"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = setup.alice.post(
        "/v1/sandboxes", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and error_of(r)["code"] == "invalid-config"
    assert setup.alice.get("/v1/sandboxes").json() == {"sandboxes": []}


def test_unknown_routes_and_methods_have_the_error_shape(setup: Setup) -> None:
    r = setup.alice.get("/v1/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not-found"
    r = setup.alice.patch("/v1/sandboxes")
    assert r.status_code == 405 and error_of(r)["code"] == "method-not-allowed"


# --------------------------------------------------------------------------- commands


def test_commands_take_argv_env_cwd_stdin_and_timeout(setup: Setup) -> None:
    sid = setup.create(env={"FROM_SANDBOX": "s"})["id"]
    c = setup.alice
    events = stream_events(
        c,
        sid,
        cmd=["sh", "-c", "echo $FROM_SANDBOX$X; pwd; exit 3"],
        env={"X": "y"},
        cwd=str(setup.files),
    )
    out = "".join(e["data"] for e in events if e["type"] == "stdout")
    assert out == f"sy\n{setup.files}\n"
    assert events[-1]["exit_code"] == 3
    events = stream_events(c, sid, cmd="tr a-z A-Z", stdin="hello")
    assert "".join(e["data"] for e in events if e["type"] == "stdout") == "HELLO"
    events = stream_events(c, sid, cmd="echo before; sleep 30", timeout=0.5)
    assert events[-1]["type"] == "exit" and events[-1]["timed_out"] is True
    assert {"type": "stdout", "data": "before\n"} in events

    r = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": ["no-such-command-here"]})
    assert r.status_code == 422 and error_of(r)["code"] == "command-not-found"
    r = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true", "cwd": "/no/such/dir"})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-cwd"
    for bad in (
        {"cmd": ""},
        {"cmd": []},
        {"cmd": "true", "timeout": 0},
        {"cmd": "x", "y": 1},
        {"cmd": "true", "env": {"A=": "b"}},
        {"cmd": "true", "cwd": "../x"},
    ):
        r = c.post(f"/v1/sandboxes/{sid}/commands", json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert error_of(r)["code"] == "invalid-config"
    c.delete(f"/v1/sandboxes/{sid}")


def test_a_client_that_disconnects_gets_its_command_killed(setup: Setup) -> None:
    sid = setup.create()["id"]
    with setup.alice.stream(
        "POST",
        f"/v1/sandboxes/{sid}/commands",
        json={"cmd": "echo $$; exec sleep 600", "timeout": None},
    ) as r:
        lines = r.iter_lines()
        started = json.loads(next(lines))
        assert started["type"] == "started"
        pid = int(json.loads(next(lines))["data"])
        assert pid == started["pid"]
    # the connection is closed: the command is killed (checked from inside the sandbox)
    for _ in iter_wait("the command to be killed"):
        events = stream_events(setup.alice, sid, cmd=f"kill -0 {pid}")
        if events[-1]["exit_code"] != 0:
            break
    assert any(
        e.get("message") == "command killed: its client disconnected" for e in setup.server.events()
    )
    setup.alice.delete(f"/v1/sandboxes/{sid}")


def test_a_sandbox_killed_during_a_command_ends_its_stream_with_an_error(setup: Setup) -> None:
    sid = setup.create()["id"]
    got: list[dict[str, Any]] = []

    def run() -> None:
        stream_events(setup.alice, sid, got, cmd="echo go; sleep 600", timeout=None)

    t = threading.Thread(target=run)
    t.start()
    for _ in iter_wait("the command to start"):
        if len(got) >= 2:
            break
    assert setup.alice.delete(f"/v1/sandboxes/{sid}").status_code == 204
    t.join(60)
    assert not t.is_alive()
    assert got[-1]["type"] == "error"
    assert got[-1]["error"]["code"] == "sandbox-not-running"


# --------------------------------------------------------------------------- lifecycle


def test_pause_resume_lifetime_and_filters(setup: Setup) -> None:
    a = setup.create(labels={"team": "a", "tier": "x"})["id"]
    b = setup.create(labels={"team": "b"})["id"]
    c = setup.alice

    def ids(**params: Any) -> list[str]:
        r = c.get("/v1/sandboxes", params=params)
        assert r.status_code == 200, r.text
        return [s["id"] for s in r.json()["sandboxes"]]

    assert ids() == [a, b]
    assert ids(label="team=a") == [a]
    assert ids(label=["team=a", "tier=x"]) == [a]
    assert ids(label=["team=a", "tier=y"]) == []
    r = c.get("/v1/sandboxes", params={"label": "team"})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"
    r = c.get("/v1/sandboxes", params={"state": "sleepy"})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"

    r = c.post(f"/v1/sandboxes/{a}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert ids(state="paused") == [a]
    assert ids(state=["running"]) == [b]
    r = c.post(f"/v1/sandboxes/{a}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-not-running"
    r = c.post(f"/v1/sandboxes/{a}/pause")
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-not-running"
    r = c.post(f"/v1/sandboxes/{a}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running"

    r = c.put(f"/v1/sandboxes/{b}/timeout", json={"timeout": None})
    assert r.status_code == 200 and r.json()["expires_at"] is None
    for bad in ({}, {"timeout": 0}, {"timeout": "1"}, {"timeout": 1, "x": 2}):
        r = c.put(f"/v1/sandboxes/{b}/timeout", json=bad)
        assert r.status_code == 422 and error_of(r)["code"] == "invalid-config", bad
    r = c.put(f"/v1/sandboxes/{b}/timeout", json={"timeout": 0.5})
    assert r.status_code == 200 and r.json()["expires_at"] is not None
    for _ in iter_wait("the lifetime to end"):
        body = c.get(f"/v1/sandboxes/{b}").json()
        if body["state"] != "running":
            break
    assert body["state"] == "killed" and body["expired"] is True
    r = c.post(f"/v1/sandboxes/{b}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-expired"
    r = c.put(f"/v1/sandboxes/{b}/timeout", json={"timeout": 60})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-expired"
    assert ids(state="killed") == [b]
    assert c.delete(f"/v1/sandboxes/{b}").status_code == 204
    c.delete(f"/v1/sandboxes/{a}")


def test_a_crashed_sandbox_says_so_and_is_released(setup: Setup) -> None:
    sid = setup.create()["id"]
    [agent] = pids_matching(vmm_marker(sid))  # the in-process provider's "VM"
    os.kill(agent, signal.SIGKILL)
    for _ in iter_wait("the crash to show"):
        body = setup.alice.get(f"/v1/sandboxes/{sid}").json()
        if body["state"] != "running":
            break
    assert body["state"] == "crashed" and body["crash_reason"]
    r = setup.alice.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-crashed"
    r = setup.alice.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hostname"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-crashed"
    for _ in iter_wait("the server to release it"):
        if sid not in setup.entries():
            break
    assert setup.alice.get(f"/v1/sandboxes/{sid}").json()["state"] == "crashed"
    assert setup.alice.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert setup.alice.get(f"/v1/sandboxes/{sid}").status_code == 404


# --------------------------------------------------------------------------- files


def test_file_operations(setup: Setup) -> None:
    sid = setup.create()["id"]
    c = setup.alice
    base = f"/v1/sandboxes/{sid}/files"
    d = setup.files / "tree"
    r = c.post(f"{base}/mkdir", params={"path": str(d / "a" / "b")})
    assert r.status_code == 201 and r.json() == {"path": str(d / "a" / "b"), "created": True}
    r = c.post(f"{base}/mkdir", params={"path": str(d / "a")})
    assert r.json() == {"path": str(d / "a"), "created": False}
    r = c.put(base, params={"path": str(d / "a" / "f.sh"), "mode": "755"}, content=b"#!/bin/sh\n")
    assert r.status_code == 200
    entries = c.get(f"{base}/list", params={"path": str(d / "a")}).json()["entries"]
    assert [(e["name"], e["type"]) for e in entries] == [("b", "dir"), ("f.sh", "file")]
    st = c.get(f"{base}/stat", params={"path": str(d / "a" / "f.sh")}).json()
    assert st["size"] == 10 and st["mode"] & 0o777 == 0o755
    assert st["permissions"] == "rwxr-xr-x" and st["symlink_target"] is None
    assert st["owner"] and st["group"] and st["modified_time"].endswith("Z")
    deep = c.get(f"{base}/list", params={"path": str(d), "depth": 3}).json()["entries"]
    assert [e["path"] for e in deep] == [str(d / "a"), str(d / "a" / "b"), str(d / "a" / "f.sh")]
    r = c.get(f"{base}/list", params={"path": str(d), "depth": 3, "max_entries": 2})
    assert (r.status_code, error_of(r)["code"]) == (409, "too-many-entries")
    r = c.post(f"{base}/rename", params={"path": str(d / "a" / "f.sh"), "to": str(d / "g.sh")})
    assert r.status_code == 200 and r.json()["path"] == str(d / "g.sh")
    r = c.post(f"{base}/rename", params={"path": str(d / "g.sh"), "to": str(d / "a")})
    assert (r.status_code, error_of(r)["code"]) == (409, "file-exists")
    with c.stream("POST", f"{base}/watch", params={"path": str(d / "a")}) as watch:
        lines = watch.iter_lines()
        assert json.loads(next(lines)) == {"type": "watching", "path": str(d / "a")}
        (d / "a" / "new").write_text("x")
        assert json.loads(next(lines))["events"][0] == {"name": "new", "type": "create"}
    assert c.get(f"{base}/exists", params={"path": str(d / "a")}).json() == {"exists": True}
    assert c.get(f"{base}/exists", params={"path": str(d / "zz")}).json() == {"exists": False}

    for method, path, params, status, code in [
        ("GET", base, {"path": str(d / "missing")}, 404, "file-not-found"),
        ("GET", f"{base}/stat", {"path": str(d / "missing")}, 404, "file-not-found"),
        ("GET", base, {"path": str(d / "a")}, 409, "file-error"),  # a directory
        ("GET", base, {"path": "/dev/zero"}, 409, "not-a-regular-file"),
        ("GET", base, {"path": "../etc/passwd"}, 422, "invalid-config"),
        ("GET", base, {}, 422, "invalid-config"),  # no path
        ("PUT", base, {"path": str(d), "mode": "999"}, 422, "invalid-config"),
        ("GET", base, {"path": str(d / "a" / "f.sh"), "timeout": "nan"}, 422, "invalid-config"),
    ]:
        r = c.request(method, path, params=params)
        assert r.status_code == status, (path, params, r.text)
        assert error_of(r)["code"] == code, (path, params)

    assert c.delete(base, params={"path": str(d / "a")}).status_code == 204
    assert c.get(f"{base}/exists", params={"path": str(d / "a")}).json() == {"exists": False}
    c.delete(f"/v1/sandboxes/{sid}")


def test_uploads_and_downloads_are_bounded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "k")
    with Server(state, "--max-file-mib", "1", env=server_env()) as server, server.client(key) as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 60}).json()["id"]
        target = tmp_path / "big.bin"
        base = f"/v1/sandboxes/{sid}/files"
        r = c.put(base, params={"path": str(target)}, content=b"x" * ((1 << 20) + 1))
        assert r.status_code == 413 and error_of(r)["code"] == "file-too-large"
        assert not target.exists()  # refused by its Content-Length before anything

        def chunks() -> Iterator[bytes]:
            for _ in range(3):
                yield b"y" * (1 << 19)

        r = c.put(base, params={"path": str(target)}, content=chunks())
        assert r.status_code == 413 and error_of(r)["code"] == "file-too-large"
        assert not target.exists()  # what came before the bound was removed
        target.write_bytes(b"z" * ((1 << 20) + 1))  # a file the guest made
        r = c.get(base, params={"path": str(target)})
        assert r.status_code == 413 and error_of(r)["code"] == "file-too-large"
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


# --------------------------------------------------------------------------- logs and stop


def test_logs_are_json_lines_without_keys_or_file_contents(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "logger")
    secret_data = "file-contents-" + os.urandom(8).hex()
    secret_env = "env-value-" + os.urandom(8).hex()
    with Server(state, "--log-level", "debug", env=server_env()) as server, server.client(key) as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 60, "env": {"S": secret_env}}).json()["id"]
        path = str(tmp_path / "secret.txt")
        assert (
            c.put(
                f"/v1/sandboxes/{sid}/files", params={"path": path}, content=secret_data
            ).status_code
            == 200
        )
        assert c.get(f"/v1/sandboxes/{sid}/files", params={"path": path}).text == secret_data
        argv = ["sh", "-c", 'cat "$1"; cat; echo $S', "-", path]
        out = stream_events(c, sid, cmd=argv, stdin=secret_data)
        streamed = "".join(e.get("data", "") for e in out)
        assert streamed == f"{secret_data * 2}{secret_env}\n"
        c.get("/v1/sandboxes", headers={"Authorization": f"Bearer {key}x"})  # a wrong key
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
        assert server.stop() == 0
        log = server.log()
    for line in log.splitlines():
        json.loads(line)  # every line is one JSON object
    assert key not in log and key[4:] not in log
    assert secret_data not in log
    assert secret_env not in log
    # the requests were logged, by the key's public id
    puts = [e for e in server.events() if e.get("method") == "PUT"]
    assert puts and puts[0]["status"] == 200 and puts[0]["key"].startswith("key_")
    assert any(e.get("status") == 401 and e.get("key") is None for e in server.events())


def test_sigterm_kills_the_sandboxes_and_exits_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "k")
    server = Server(state, env=server_env())
    try:
        with server.client(key) as c:
            ids = [c.post("/v1/sandboxes", json={}).json()["id"] for _ in range(2)]
            got: list[dict[str, Any]] = []
            t = threading.Thread(
                target=stream_events,
                args=(c, ids[0], got),
                kwargs={"cmd": "echo go; sleep 600", "timeout": None},
            )
            t.start()
            for _ in iter_wait("the command to start"):
                if len(got) >= 2:
                    break
            assert all(pids_matching(vmm_marker(i)) for i in ids)
            assert server.stop(signal.SIGTERM) == 0
            t.join(60)
        assert got and got[-1]["type"] == "error"
        for i in ids:
            assert pids_matching(vmm_marker(i)) == []
        assert sorted(sandboxes_dir(state).iterdir()) == []
    finally:
        server.close()


# --------------------------------------------------------------------------- binding


def test_beyond_loopback_needs_tls_or_insecure(tmp_path: Path) -> None:
    env = server_env()
    for args, words in [
        (["--host", "0.0.0.0"], "--insecure"),
        (["--host", "192.0.2.1"], "not a loopback address"),
        (["--tls-cert", str(tmp_path / "c.pem")], "both --tls-cert and --tls-key"),
        (
            ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
            "does not exist",
        ),
    ]:
        done = cli("serve", "--port", "0", "--state-dir", str(tmp_path / "s"), *args, env=env)
        assert done.returncode == 125, (args, done.stderr)
        assert "[invalid-config]" in done.stderr and words in done.stderr


def test_the_bind_rules() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert is_loopback(host)
        check_bind(host, None, None, False)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.example.com"):
        assert not is_loopback(host)
        check_bind(host, None, None, True)  # --insecure


def test_a_port_in_use_is_a_typed_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("serve", "--port", str(port), "--state-dir", str(tmp_path), env=server_env())
    assert done.returncode == 125
    assert "[invalid-config]" in done.stderr and "cannot listen" in done.stderr


def test_no_typed_error_is_a_500() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, NovaSandboxError)
    ]
    assert len(classes) > 20
    for cls in classes:
        status = status_of(cls.__new__(cls))
        assert 400 <= status < 600 and status != 500, cls
    assert status_of(errors.HostMemoryExhausted("x")) == 503
    assert status_of(errors.SandboxExpired("x")) == 409
    assert status_of(errors.SandboxCrashed("x")) == 409
    assert status_of(errors.SandboxNotFound("x")) == 404
    assert status_of(errors.ConfigError("x")) == 422
    assert set(ERROR_STATUS) <= {*classes, *ERROR_STATUS}
