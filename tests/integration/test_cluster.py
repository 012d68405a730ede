"""The cluster server (``serve --ray``) over a real multi-node Ray cluster on this machine
(``tests/ray_cluster.py``: a head on a bridge, three nodes in network namespaces), with
real VMs (QEMU, the python template) on the nodes, through the real HTTP API and the
public client. The tests run in order on one cluster; the last one kills a node.

Judged at the end: every sandbox made is gone (the nodes' state directories hold no
sandbox, no QEMU process of theirs is left), and so is the cluster (no Ray process,
namespace or link)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from novasandbox import NoCapacity, Sandbox, SandboxLost, SnapshotNotFound
from novasandbox.gc import kill_sandbox, vmm_pids_under
from novasandbox.records import list_sandboxes
from tests.mcp_support import check_tools, fails, http_client, ok
from tests.ray_cluster import RayCluster, can_run
from tests.server_support import CLI, Server, make_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]

NODES = 3
SLOTS = 2


class Setup:
    def __init__(self) -> None:
        self.cluster = RayCluster(NODES, slots=SLOTS)
        self.state = self.cluster.root / "server"
        self.state.mkdir()
        self.node_state = self.cluster.root / "nodes"
        self.key = make_key(self.state, "tests")
        self.server = self.start_server()
        self.made: list[Sandbox] = []

    def start_server(self) -> Server:
        self.log = self.cluster.root / f"server-{time.monotonic_ns()}.log"
        return Server(
            self.state,
            "--ray",
            self.cluster.address,
            "--ray-node-ip",
            self.cluster.head_address,
            "--node-state-dir",
            str(self.node_state),
            log=self.log,
        )

    def node_server(self, node_id: str) -> tuple[str, str]:
        """A node's own server (its URL, from the server's log, and its key): what only
        the cluster server talks to."""
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("message") == "node attached" and entry.get("node") == node_id:
                    address = next(
                        n["address"] for n in self.status()["nodes"] if n["node_id"] == node_id
                    )
                    key = (self.node_state / f"node-{address}" / "cluster.key").read_text()
                    return str(entry["url"]), key.strip()
        raise AssertionError(f"node {node_id} was not attached by this server")

    def create(self, **kwargs: Any) -> Sandbox:
        sb = Sandbox.create("python", server=self.server.url, api_key=self.key, **kwargs)
        self.made.append(sb)
        return sb

    def status(self) -> dict[str, Any]:
        with self.server.client(self.key) as c:
            r = c.get("/v1/cluster")
            assert r.status_code == 200, r.text
            return dict(r.json())

    def nodes_by_address(self) -> dict[str, dict[str, Any]]:
        return {n["address"]: n for n in self.status()["nodes"]}

    def listed(self) -> dict[str, dict[str, Any]]:
        with self.server.client(self.key) as c:
            return {s["id"]: s for s in c.get("/v1/sandboxes").json()["sandboxes"]}

    def kill_all(self) -> None:
        errors = []
        for sb in self.made:
            try:
                sb.kill()
            except Exception as exc:  # keep killing the others
                errors.append(exc)
        self.made.clear()
        assert not errors, errors

    def close(self) -> None:
        try:
            self.kill_all()
            self.server.close()
        finally:
            left_vmms = vmm_pids_under(self.node_state)
            left: list[str] = []
            for node_dir in sorted(self.node_state.glob("node-*")):
                for info in list_sandboxes(node_dir):  # what a killed node left: reap
                    if not any(n.killed and n.address in node_dir.name for n in self.cluster.nodes):
                        left.append(f"{info.id} on {node_dir.name}")
                    kill_sandbox(info.id, node_dir)
            self.cluster.close()
            assert self.cluster.leftovers() == []
            assert left == [], f"sandboxes left on live nodes: {left}"
            assert left_vmms == [], f"QEMU processes left: {left_vmms}"


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    s = Setup()
    try:
        yield s
    finally:
        s.close()


def test_sandboxes_spread_over_every_node_run_and_move_files(setup: Setup) -> None:
    nodes = setup.nodes_by_address()
    assert sorted(nodes) == sorted(n.address for n in setup.cluster.nodes)
    assert all(n["state"] == "ready" and "python" in n["templates"] for n in nodes.values())
    # every slot of every node: the limits force a spread over all of them
    sbs = [setup.create() for _ in range(NODES * SLOTS)]
    listed = setup.listed()
    by_node: dict[str, list[Sandbox]] = {}
    for sb in sbs:
        assert sb.node and listed[sb.id]["node"] == sb.node
        by_node.setdefault(sb.node, []).append(sb)
    assert sorted(len(v) for v in by_node.values()) == [SLOTS] * NODES
    for i, sb in enumerate(sbs):
        r = sb.commands.run(f"echo sandbox {i} on $(cat /proc/sys/kernel/random/boot_id)")
        assert r.exit_code == 0 and r.stdout.startswith(f"sandbox {i} on ")
        data = os.urandom(1 << 20) + sb.id.encode()
        sb.files.write("/tmp/blob", data)
        r = sb.commands.run("sha256sum /tmp/blob")
        assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
        assert sb.files.read("/tmp/blob", format="bytes") == data
    # streamed as it comes, through the node
    seen: list[float] = []
    t0 = time.monotonic()
    sbs[0].commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.5; done",
        on_stdout=lambda _t: seen.append(time.monotonic() - t0),
    )
    assert len(seen) == 3 and seen[-1] - seen[0] > 0.5
    # a path written to reach another sandbox through a node is refused, not resolved
    host, port = setup.server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(
        "GET",
        f"/v1/sandboxes/{sbs[0].id}/../{sbs[1].id}/files/exists?path=/etc/hostname",
        headers={"Authorization": f"Bearer {setup.key}"},
    )
    assert conn.getresponse().status == 404
    conn.close()
    # full: the next create is refused, and nothing changes
    with pytest.raises(NoCapacity, match="slots taken"):
        setup.create()
    assert setup.status()["sandboxes"] == NODES * SLOTS
    # the CLI sees the nodes
    env = {**os.environ, "NOVASANDBOX_SERVER": setup.server.url, "NOVASANDBOX_API_KEY": setup.key}
    out = subprocess.run([*CLI, "cluster", "status"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    for address in nodes:
        assert address in out.stdout
    assert f"{SLOTS}/{SLOTS}" in out.stdout
    ls = subprocess.run([*CLI, "ls"], capture_output=True, text=True, env=env)
    assert ls.returncode == 0 and "node" in ls.stdout.splitlines()[0]
    assert sbs[0].node is not None and sbs[0].node[:12] in ls.stdout
    setup.kill_all()
    used = [n["used"]["sandboxes"] for n in setup.status()["nodes"]]
    assert used == [0] * NODES


def test_a_restarted_server_routes_the_sandboxes_again(setup: Setup) -> None:
    sbs = [setup.create() for _ in range(3)]
    for sb in sbs:
        sb.files.write("/tmp/kept", sb.id)
    where = {sb.id: sb.node for sb in sbs}
    assert setup.server.stop() == 0
    setup.server = setup.start_server()
    setup.made = [sb for sb in setup.made if sb not in sbs]  # the old server's clients
    listed = setup.listed()
    for sb in sbs:
        assert listed[sb.id]["node"] == where[sb.id]
        again = Sandbox.connect(sb.id, server=setup.server.url, api_key=setup.key)
        setup.made.append(again)
        assert again.node == where[sb.id]
        assert again.files.read("/tmp/kept") == sb.id
        assert again.commands.run("echo back").stdout == "back\n"
    # another key sees none of them
    other = make_key(setup.state, "other")
    assert Sandbox.list(server=setup.server.url, api_key=other) == []
    setup.kill_all()


def test_snapshots_forks_and_signed_urls_through_the_cluster(setup: Setup) -> None:
    sb = setup.create()
    sb.files.write("/tmp/state", "before")
    snap = sb.snapshot()
    sb.files.write("/tmp/state", "after")
    listed = Sandbox.list_snapshots(server=setup.server.url, api_key=setup.key)
    assert [s.id for s in listed] == [snap.id]
    # a fork runs on its parent's node, from its state now; beyond that node's room:
    # no-capacity, and nothing changed there
    used = {n["node_id"]: n["used"]["sandboxes"] for n in setup.status()["nodes"]}
    with pytest.raises(NoCapacity, match="slots taken"):
        sb.fork(SLOTS)
    assert {n["node_id"]: n["used"]["sandboxes"] for n in setup.status()["nodes"]} == used
    (child,) = sb.fork(1)
    setup.made.append(child)
    assert child.node == sb.node and setup.listed()[child.id]["node"] == sb.node
    assert child.files.read("/tmp/state") == "after"
    # its node is full now: a restore (which runs where the snapshot is) is refused
    with pytest.raises(NoCapacity, match=f"snapshot {snap.id}"):
        setup.create(from_snapshot=snap.id)
    child.kill()
    restored = setup.create(from_snapshot=snap.id)
    assert restored.node == sb.node and restored.files.read("/tmp/state") == "before"
    # another key sees none of it
    other = make_key(setup.state, "snapshots-other")
    assert Sandbox.list_snapshots(server=setup.server.url, api_key=other) == []
    with pytest.raises(SnapshotNotFound):
        Sandbox.create("python", from_snapshot=snap.id, server=setup.server.url, api_key=other)
    # signed URLs: the server's own, relayed to the node; nothing else opens with them
    up = sb.upload_url("/tmp/signed.bin")
    down = sb.download_url("/tmp/signed.bin")
    assert up.startswith(setup.server.url + "/v1/signed/") and down.startswith(setup.server.url)
    data = os.urandom(300_000)
    r = httpx.put(up, content=data, timeout=60)
    assert r.status_code == 200, r.text
    assert sb.files.read("/tmp/signed.bin", format="bytes") == data
    r = httpx.get(down, timeout=60)
    assert r.status_code == 200 and r.content == data
    for bad in (down.replace("signed.bin", "other.bin"), down[:-4] + "0000", up):
        r = httpx.get(bad, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "signature-invalid", r.text
    # a restarted server knows whose the snapshot is, from its node
    old_url = setup.server.url
    assert setup.server.stop() == 0
    setup.server = setup.start_server()
    setup.made = [s for s in setup.made if s not in (sb, restored)]
    for s in (sb, restored):
        setup.made.append(Sandbox.connect(s.id, server=setup.server.url, api_key=setup.key))
    listed = Sandbox.list_snapshots(server=setup.server.url, api_key=setup.key)
    assert [s.id for s in listed] == [snap.id]
    # and its URLs still work (its secret is kept; the new server listens elsewhere)
    r = httpx.get(down.replace(old_url, setup.server.url), timeout=60)
    assert r.status_code == 200 and r.content == data
    Sandbox.delete_snapshot(snap.id, server=setup.server.url, api_key=setup.key)
    assert Sandbox.list_snapshots(server=setup.server.url, api_key=setup.key) == []
    setup.kill_all()


def test_a_sandbox_whose_create_reply_was_lost_is_killed(setup: Setup) -> None:
    """An orphan: made on a node (with an owner) by a create whose reply never came back
    to the server, so nobody can reach it. The server kills it within a few rounds of
    reading its node's list, and never lists it."""
    node_id = setup.status()["nodes"][0]["node_id"]
    url, node_key = setup.node_server(node_id)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {node_key}"}) as node:
        r = node.post(
            "/v1/sandboxes",
            json={"template": "python", "labels": {"novasandbox.owner": "someone"}},
            timeout=120,
        )
        assert r.status_code == 201, r.text
        orphan = r.json()["id"]
        t0 = time.monotonic()
        while True:  # killed: the node forgets it
            r = node.get(f"/v1/sandboxes/{orphan}")
            if r.status_code == 404:
                assert r.json()["error"]["code"] == "sandbox-not-found"
                break
            assert r.status_code == 200 and r.json()["state"] == "running", r.text
            assert time.monotonic() - t0 < 60, "the orphan was not killed"
            assert orphan not in setup.listed()
            time.sleep(0.5)
        print(f"\norphan killed after {time.monotonic() - t0:.1f} s")


def test_drain_and_a_node_that_joins(setup: Setup) -> None:
    first = setup.cluster.nodes[0]
    node_id = setup.nodes_by_address()[first.address]["node_id"]
    kept = None
    while kept is None:  # a sandbox on the first node, to go on running while it drains
        sb = setup.create()
        if sb.node == node_id:
            kept = sb
        else:
            sb.kill()
        assert len(setup.made) < 50, "placement never chose the first node"
    env = {**os.environ}
    drain = [*CLI, "cluster", "drain", node_id[:10], "--ray", setup.cluster.address]
    drain += ["--ray-node-ip", setup.cluster.head_address]
    out = subprocess.run(drain, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while setup.nodes_by_address()[first.address]["state"] != "draining":
        assert time.monotonic() < deadline, "the server did not see the drain"
        time.sleep(0.2)
    placed = []
    with pytest.raises(NoCapacity, match="draining"):  # every free slot but the drained
        while True:
            placed.append(setup.create())
    assert len(placed) == (NODES - 1) * SLOTS
    assert all(sb.node != node_id for sb in placed)
    assert kept.commands.run("echo still").stdout == "still\n"
    for sb in placed:
        sb.kill()
    # a new node adds capacity at once
    joined = setup.cluster.add_node()
    deadline = time.monotonic() + 120
    while setup.nodes_by_address().get(joined.address, {}).get("state") != "ready":
        assert time.monotonic() < deadline, "the new node was not attached"
        time.sleep(0.5)
    new_id = setup.nodes_by_address()[joined.address]["node_id"]
    more = []
    while not any(sb.node == new_id for sb in more):
        more.append(setup.create())
        assert len(more) <= SLOTS * NODES, "nothing was placed on the new node"
    undrain = [*CLI, "cluster", "undrain", node_id[:10], "--ray", setup.cluster.address]
    undrain += ["--ray-node-ip", setup.cluster.head_address]
    assert subprocess.run(undrain, capture_output=True, env=env, timeout=120).returncode == 0
    setup.kill_all()
    # removing a node: drained, empty, then its Ray stopped: it leaves, nothing is lost
    drain = [*CLI, "cluster", "drain", new_id[:10], "--ray", setup.cluster.address]
    drain += ["--ray-node-ip", setup.cluster.head_address]
    assert subprocess.run(drain, capture_output=True, env=env, timeout=120).returncode == 0
    deadline = time.monotonic() + 30
    while setup.nodes_by_address()[joined.address]["state"] != "draining":
        assert time.monotonic() < deadline, "the server did not see the drain"
        time.sleep(0.2)
    setup.cluster.kill_node(joined.index)
    deadline = time.monotonic() + 30
    while joined.address in (nodes := setup.nodes_by_address()):
        assert nodes[joined.address]["state"] == "draining", nodes[joined.address]
        assert time.monotonic() < deadline, "the removed node is still listed"
        time.sleep(0.1)
    assert all(n["state"] == "ready" for n in setup.nodes_by_address().values())


def test_mcp_through_the_cluster(setup: Setup) -> None:
    async def main() -> str:
        async with http_client(setup.server.url, setup.key) as client:
            check_tools(await client.list_tools())
            r = await ok(client, "run_command", {"command": "echo hi"})
            session = str(r["sandbox_id"])
            assert r["stdout"] == "hi\n"
            listed = setup.listed()
            assert listed[session]["labels"] == {"mcp": "session"} and listed[session]["node"]
            await ok(client, "write_file", {"path": "notes.txt", "content": "hello"})
            got = await ok(client, "read_file", {"path": "notes.txt"})
            assert (got["path"], got["content"]) == ("/home/user/notes.txt", "hello")
            files = await ok(client, "list_files", {"path": "."})
            assert files["path"] == "/home/user"
            assert "notes.txt" in [e["name"] for e in files["entries"]]
            made = await ok(client, "create_sandbox", {"timeout_seconds": 120})
            other = str(made["sandbox_id"])
            r = await ok(client, "run_command", {"command": "hostname", "sandbox_id": other})
            assert r["stdout"] == f"{other}\n"
            await ok(client, "kill_sandbox", {"sandbox_id": other})
            await fails(
                client, "run_command", {"command": "true", "sandbox_id": other}, "sandbox-not-found"
            )
            return session

    session = asyncio.run(main())
    deadline = time.monotonic() + 30
    while session in setup.listed():  # the session's sandbox dies with the session
        assert time.monotonic() < deadline, "the MCP session's sandbox outlived it"
        time.sleep(0.2)


def test_a_killed_node_loses_its_sandboxes_and_the_others_answer(setup: Setup) -> None:
    sbs = []
    victim_node = setup.cluster.nodes[1]
    victim_id = setup.nodes_by_address()[victim_node.address]["node_id"]
    while sum(sb.node == victim_id for sb in sbs) < 2:
        try:
            sbs.append(setup.create())
        except NoCapacity:
            print(setup.status(), setup.listed(), victim_id, [sb.node for sb in sbs])
            raise
    victims = [sb for sb in sbs if sb.node == victim_id]
    others = [sb for sb in sbs if sb.node != victim_id]
    assert others, "every sandbox went to one node"
    # a command streaming on the node when it dies
    outcome: dict[str, Any] = {}

    def long_command() -> None:
        try:
            victims[0].commands.run("sleep 60", timeout=120)
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=long_command)
    thread.start()
    time.sleep(1.0)
    killed_at = setup.cluster.kill_node(1)
    lost_after = None
    while lost_after is None:
        listed = setup.listed()
        if all(listed[sb.id]["state"] == "lost" for sb in victims):
            lost_after = time.monotonic() - killed_at
        assert time.monotonic() - killed_at < 30, "the node's loss was not noticed"
        time.sleep(0.05)
    print(f"\nnode lost after {lost_after:.2f} s")  # benchmarks/bench_cluster.py reports it
    thread.join(30)
    assert isinstance(outcome.get("error"), SandboxLost), outcome
    for sb in victims:
        with pytest.raises(SandboxLost) as err:
            sb.commands.run("echo hi")
        assert err.value.node == victim_id and err.value.code == "sandbox-lost"
        assert sb.state == "lost"
    for sb in others:
        assert sb.commands.run("echo alive").stdout == "alive\n"
    node = setup.nodes_by_address()[victim_node.address]
    assert node["state"] == "lost" and node["lost_reason"]
    # new sandboxes go to the nodes that are left
    others[0].kill()
    fresh = setup.create()
    assert fresh.node != victim_id
    setup.kill_all()
    assert victim_node.pids() == []
