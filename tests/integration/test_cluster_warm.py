"""Warm starts through a cluster, on real QEMU (a Ray cluster on this machine,
``tests/ray_cluster.py``): ``serve --ray --prestart python=1`` keeps a VMM started ahead
on every node, and a create placed there restores into it; ``--pool python=1`` keeps a
warm sandbox on every node, refilled by the node, and a node that comes back fills its
own."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from novasandbox import Sandbox
from novasandbox.gc import kill_sandbox, vmm_pids_under
from novasandbox.records import list_sandboxes
from tests.ray_cluster import RayCluster, can_run
from tests.server_support import Server

from .test_prestart import waiting

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]


@contextmanager
def cluster_server(*args: str) -> Iterator[tuple[RayCluster, Server, str, Path]]:
    """A one-node cluster and its server (``args``: serve's options); at the end nothing
    of either is left: the nodes' VMMs still waiting are reaped as gc would."""
    cluster = RayCluster(1, slots=2)
    server = None
    nodes = cluster.root / "nodes"
    try:
        server, key = cluster.serve(*args)
        yield cluster, server, key, nodes
    finally:
        if server is not None:
            server.close()
        vmms = vmm_pids_under(cluster.root)
        for node_dir in nodes.glob("node-*"):
            for info in list_sandboxes(node_dir):
                kill_sandbox(info.id, node_dir)
        cluster.close()
        assert cluster.leftovers() == []
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in vmms) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in vmms if os.path.exists(f"/proc/{p}")] == []


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_every_node_keeps_vmms_started_ahead_for_its_creates() -> None:
    with cluster_server("--prestart", "python=1") as (cluster, server, key, nodes):
        node_dir = nodes / f"node-{cluster.nodes[0].address}"
        wait_for(lambda: len(waiting(node_dir)) == 1, "a VMM started ahead")
        (spare, _), *_ = waiting(node_dir).items()
        sb = Sandbox.create("python", server=server.url, api_key=key)
        try:
            assert sb.id == spare and sb.restored  # the VMM that waited, restored into
            assert sb.commands.run("echo hi").stdout == "hi\n"
        finally:
            sb.kill()
        wait_for(lambda: len(waiting(node_dir)) == 1, "another VMM in the used one's place")
        assert spare not in waiting(node_dir)


def test_every_node_keeps_its_pool_and_a_node_that_comes_back_fills_its_own() -> None:
    with cluster_server("--pool", "python=1") as (cluster, server, key, _):

        def pools() -> dict[str, dict[str, int]]:
            r = httpx.get(server.url + "/v1/cluster", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            return {n["address"]: n["pools"] for n in r.json()["nodes"] if n["state"] == "ready"}

        first = cluster.nodes[0].address
        wait_for(lambda: pools().get(first) == {"python": 1}, "the node's pool")
        sb = Sandbox.create("python", server=server.url, api_key=key)
        try:
            r = httpx.get(
                f"{server.url}/v1/sandboxes/{sb.id}", headers={"Authorization": f"Bearer {key}"}
            )
            assert r.json()["pooled"] is True, r.text  # the node's warm one, handed over
            assert sb.commands.run("echo hi").stdout == "hi\n"
        finally:
            sb.kill()
        wait_for(lambda: pools().get(first) == {"python": 1}, "the pool refilled")
        # the node goes, and comes back (a new Ray node on that host): its own pool
        cluster.kill_node(0)
        wait_for(lambda: first not in pools(), "the node lost")
        back = cluster.add_node()
        wait_for(lambda: pools().get(back.address) == {"python": 1}, "the new node's pool")
