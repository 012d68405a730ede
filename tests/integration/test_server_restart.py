"""A server that restarts loses nothing silently; snapshots, restores and forks through
the API, owned per key. Real VMs, real ``novasandbox serve`` subprocesses started again
on the same state directory, real HTTP.

At teardown nothing of the test's sandboxes may be left (judged by the ids of every
sandbox made under the state directory, learnt by inotify), whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from novasandbox.gc import kill_sandbox
from novasandbox.records import list_sandboxes, read_record, sandboxes_dir
from tests.server_support import Server, error_of, iter_wait, make_key, stream_events

from .conftest import qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers, leftovers_of

pytestmark = pytest.mark.integration


class Restarts:
    """A state directory, two keys, and the servers started on it one after another."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        self.alice_key = make_key(self.root, "alice")
        self.bob_key = make_key(self.root, "bob")
        self.servers: list[Server] = []
        self.clients: list[httpx.Client] = []

    def start(self, *args: str) -> tuple[Server, httpx.Client, httpx.Client]:
        server = Server(self.root, *args, log=Path(f"{self.root}-{len(self.servers)}.log"))
        self.servers.append(server)
        alice, bob = server.client(self.alice_key), server.client(self.bob_key)
        self.clients += [alice, bob]
        return server, alice, bob

    def owned_files(self) -> list[str]:
        base = self.root / "server" / "sandboxes"
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def entries(self) -> list[str]:
        base = sandboxes_dir(self.root)
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def close(self) -> None:
        try:
            for c in self.clients:
                c.close()
            for server in self.servers:
                server.close()
            left = qemu_processes_under(self.root)
            for info in list_sandboxes(self.root):  # what a failed stop left: clean, then fail
                kill_sandbox(info.id, self.root)
            assert left == [], f"QEMU processes outlived the servers: {left}"
            assert self.entries() == []
            check_no_leftovers(self.root, self.ids.all())
        finally:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            for server in self.servers:
                server.log_path.unlink(missing_ok=True)


@pytest.fixture
def restarts() -> Iterator[Restarts]:
    r = Restarts()
    try:
        yield r
    finally:
        r.close()


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def stdout(client: httpx.Client, sandbox_id: str, cmd: str) -> str:
    events = stream_events(client, sandbox_id, cmd=cmd)
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0, events
    return "".join(e["data"] for e in events if e["type"] == "stdout")


def not_found(r: httpx.Response, code: str = "sandbox-not-found") -> bool:
    return r.status_code == 404 and error_of(r)["code"] == code


def test_a_restarted_server_adopts_its_sandboxes_and_reaps_the_rest(restarts: Restarts) -> None:
    first, alice, bob = restarts.start()
    kept = create(alice, labels={"job": "restart"})
    doomed = create(alice)
    short = create(bob)
    r = alice.put(
        f"/v1/sandboxes/{kept['id']}/files", params={"path": "/home/user/note"}, content=b"kept"
    )
    assert r.status_code == 200, r.text
    for sb in (kept, doomed, short):
        path = restarts.root / "server" / "sandboxes" / f"{sb['id']}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # the server dies without a word; its sandboxes go on running
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len(qemu_processes_under(restarts.root)) == 3
    # ... and one of them dies while no server runs
    info = read_record(sandboxes_dir(restarts.root) / doomed["id"])
    assert info is not None and info.pid is not None and info.alive
    os.kill(info.pid, signal.SIGKILL)
    for _ in iter_wait("the VMM to die"):
        if not info.alive:
            break

    second, alice, bob = restarts.start("--on-stop", "keep")
    got = alice.get(f"/v1/sandboxes/{kept['id']}")
    assert got.status_code == 200, got.text
    again = got.json()
    assert again["state"] == "running"
    for field in ("labels", "created_at", "expires_at", "template", "vcpus", "memory_mib"):
        assert again[field] == kept[field], field
    assert stdout(alice, kept["id"], "cat /home/user/note; echo; echo $((6*7))") == "kept\n42\n"
    r = alice.get(f"/v1/sandboxes/{kept['id']}/files", params={"path": "/home/user/note"})
    assert r.status_code == 200 and r.content == b"kept"
    # the dead one was reaped, said so, and left nothing
    assert not_found(alice.get(f"/v1/sandboxes/{doomed['id']}"))
    said = [e for e in second.events() if e.get("message", "").startswith("sandbox reaped")]
    assert [e["sandbox"] for e in said] == [doomed["id"]]
    adopted = [e["sandbox"] for e in second.events() if e.get("message") == "sandbox adopted"]
    assert sorted(adopted) == sorted([kept["id"], short["id"]])
    assert leftovers_of(restarts.root, [doomed["id"]]) == []
    # every key sees its own, and only its own
    assert [s["id"] for s in alice.get("/v1/sandboxes").json()["sandboxes"]] == [kept["id"]]
    assert [s["id"] for s in bob.get("/v1/sandboxes").json()["sandboxes"]] == [short["id"]]
    assert not_found(bob.get(f"/v1/sandboxes/{kept['id']}"))
    assert not_found(alice.delete(f"/v1/sandboxes/{short['id']}"))
    assert restarts.owned_files() == sorted(f"{s['id']}.json" for s in (kept, short))
    assert bob.get(f"/v1/sandboxes/{short['id']}").json()["expires_at"] == short["expires_at"]
    r = bob.put(f"/v1/sandboxes/{short['id']}/timeout", json={"timeout": 30})
    assert r.status_code == 200, r.text
    short = r.json()  # its lifetime now ends after the next restart

    # SIGTERM with --on-stop keep: the sandboxes stay, for the next start
    assert second.stop(signal.SIGTERM) == 0
    assert len(qemu_processes_under(restarts.root)) == 2
    assert restarts.entries() == sorted([kept["id"], short["id"]])

    third, alice, bob = restarts.start()
    assert stdout(alice, kept["id"], "cat /home/user/note") == "kept"
    assert bob.get(f"/v1/sandboxes/{short['id']}").json()["state"] == "running"
    # the lifetime set at the create is still enforced, by the server that adopted it
    for _ in iter_wait("the adopted sandbox's lifetime to end", limit=120, step=0.5):
        state = bob.get(f"/v1/sandboxes/{short['id']}").json()
        if state["state"] != "running":
            break
    assert state["state"] == "killed" and state["expired"] is True
    assert state["expires_at"] == short["expires_at"]
    assert time.time() >= short["expires_at"] - 1.0
    r = bob.post(f"/v1/sandboxes/{short['id']}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-expired"
    assert restarts.owned_files() == [f"{kept['id']}.json"]

    # SIGTERM (the default, kill): nothing stays
    assert third.stop(signal.SIGTERM) == 0
    assert qemu_processes_under(restarts.root) == []
    assert restarts.entries() == [] and restarts.owned_files() == []
    check_no_leftovers(restarts.root, restarts.ids.all())


def test_snapshot_restore_and_fork_per_key(restarts: Restarts) -> None:
    server, alice, bob = restarts.start()
    parent = create(alice, labels={"team": "a"})
    stdout(alice, parent["id"], "echo 42 > /home/user/state.txt")

    assert not_found(bob.post(f"/v1/sandboxes/{parent['id']}/snapshot"))
    r = alice.post(f"/v1/sandboxes/{parent['id']}/snapshot")
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["id"].startswith("snap-") and snap["source_sandbox"] == parent["id"]
    assert snap["template"] == "python" and snap["vcpus"] == parent["vcpus"]
    assert [s["id"] for s in alice.get("/v1/snapshots").json()["snapshots"]] == [snap["id"]]
    assert bob.get("/v1/snapshots").json() == {"snapshots": []}
    r = bob.post("/v1/sandboxes", json={"snapshot": snap["id"]})
    assert not_found(r, "snapshot-not-found")
    assert not_found(bob.delete(f"/v1/snapshots/{snap['id']}"), "snapshot-not-found")

    restored = create(alice, snapshot=snap["id"])
    assert restored["restored"] is True and restored["id"] != parent["id"]
    assert stdout(alice, restored["id"], "cat /home/user/state.txt") == "42\n"

    for n in (0, 65):
        r = alice.post(f"/v1/sandboxes/{parent['id']}/fork", json={"n": n})
        assert r.status_code == 422 and error_of(r)["code"] == "invalid-config", r.text
    assert not_found(bob.post(f"/v1/sandboxes/{parent['id']}/fork", json={"n": 1}))
    stdout(alice, parent["id"], "echo 43 > /home/user/state.txt")
    r = alice.post(f"/v1/sandboxes/{parent['id']}/fork", json={"n": 2})
    assert r.status_code == 201, r.text
    forks = r.json()["sandboxes"]
    assert len(forks) == 2 and all(f["labels"] == {"team": "a"} for f in forks)
    for f in forks:
        assert stdout(alice, f["id"], "cat /home/user/state.txt") == "43\n"
        assert not_found(bob.get(f"/v1/sandboxes/{f['id']}"))
    assert bob.get("/v1/sandboxes").json() == {"sandboxes": []}

    # all of it survives a crash of the server: forks and restored ones were adoptable
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server, alice, bob = restarts.start()
    listed = alice.get("/v1/sandboxes").json()["sandboxes"]
    want = {parent["id"], restored["id"], *(f["id"] for f in forks)}
    assert {s["id"] for s in listed} == want and {s["state"] for s in listed} == {"running"}
    assert stdout(alice, forks[1]["id"], "cat /home/user/state.txt") == "43\n"
    assert [s["id"] for s in alice.get("/v1/snapshots").json()["snapshots"]] == [snap["id"]]

    assert alice.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
    assert alice.get("/v1/snapshots").json() == {"snapshots": []}
    r = alice.post("/v1/sandboxes", json={"snapshot": snap["id"]})
    assert not_found(r, "snapshot-not-found")
    assert stdout(alice, restored["id"], "cat /home/user/state.txt") == "42\n"  # still runs

    assert server.stop(signal.SIGTERM) == 0
    assert qemu_processes_under(restarts.root) == []
    snapshots = restarts.root / "snapshots"
    assert not snapshots.is_dir() or list(snapshots.iterdir()) == []  # forks' went too
    check_no_leftovers(restarts.root, restarts.ids.all())


def _pool_ready(client: httpx.Client) -> int:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('novasandbox_pool_size{template="python"}'):
            return int(float(line.split()[-1]))
    raise AssertionError("no pool gauge")


def _pooled_ids(restarts: Restarts) -> list[str]:
    base = restarts.root / "server" / "sandboxes"
    return sorted(
        p.stem for p in base.glob("*.json") if json.loads(p.read_text()).get("pooled") is True
    )


def test_a_crashed_servers_idle_pooled_sandbox_is_reaped_and_the_pool_refilled(
    restarts: Restarts,
) -> None:
    first, alice, _ = restarts.start("--pool", "python=1")
    for _ in iter_wait("the warm pool to fill", limit=180):
        if _pool_ready(alice) == 1:
            break
    [idle] = _pooled_ids(restarts)
    assert restarts.entries() == [idle]
    # the server dies without its stop: the idle pooled sandbox runs on (it is adoptable)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert len(qemu_processes_under(restarts.root)) == 1

    second, alice, _ = restarts.start("--pool", "python=1")
    said = [
        e for e in second.events() if e.get("message") == "pooled sandbox of the last run reaped"
    ]
    assert [e["sandbox"] for e in said] == [idle]
    assert leftovers_of(restarts.root, [idle]) == []  # its QEMU, state, resources: gone
    assert alice.get("/v1/sandboxes").json() == {"sandboxes": []}  # nobody's, not adopted
    for _ in iter_wait("the warm pool to refill", limit=180):
        if _pool_ready(alice) == 1:
            break
    [fresh] = _pooled_ids(restarts)
    assert fresh != idle and restarts.entries() == [fresh]
    assert second.stop(signal.SIGTERM) == 0
    assert qemu_processes_under(restarts.root) == [] and restarts.owned_files() == []
