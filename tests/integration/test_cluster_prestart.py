"""``serve --ray --prestart python=1``: every node keeps a VMM of the template started
ahead, and a create placed there restores into it (real QEMU, a one-node Ray cluster on
this machine, ``tests/ray_cluster.py``)."""

from __future__ import annotations

import os
import time

import pytest

from novasandbox import Sandbox
from novasandbox.gc import kill_sandbox, vmm_pids_under
from novasandbox.records import list_sandboxes
from tests.ray_cluster import RayCluster, can_run
from tests.server_support import Server, make_key

from .test_prestart import waiting

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]


def test_every_node_keeps_vmms_started_ahead_for_its_creates() -> None:
    cluster = RayCluster(1, slots=2)
    server = None
    try:
        state = cluster.root / "server"
        state.mkdir()
        nodes = cluster.root / "nodes"
        key = make_key(state, "tests")
        server = Server(
            state,
            "--ray",
            cluster.address,
            "--ray-node-ip",
            cluster.head_address,
            "--node-state-dir",
            str(nodes),
            "--prestart",
            "python=1",
            log=cluster.root / "server.log",
        )
        node_dir = nodes / f"node-{cluster.nodes[0].address}"
        deadline = time.monotonic() + 120
        while len(waiting(node_dir)) != 1:
            assert time.monotonic() < deadline, "the node started no VMM ahead"
            time.sleep(0.2)
        (spare, _), *_ = waiting(node_dir).items()
        sb = Sandbox.create("python", server=server.url, api_key=key)
        try:
            assert sb.id == spare and sb.restored  # the VMM that waited, restored into
            assert sb.commands.run("echo hi").stdout == "hi\n"
        finally:
            sb.kill()
        deadline = time.monotonic() + 120
        while len(waiting(node_dir)) != 1:  # another one in its place
            assert time.monotonic() < deadline, "no VMM was started in the used one's place"
            time.sleep(0.2)
        assert spare not in waiting(node_dir)
    finally:
        if server is not None:
            server.close()
        vmms = vmm_pids_under(cluster.root)
        for node_dir in (cluster.root / "nodes").glob("node-*"):
            for info in list_sandboxes(node_dir):  # the one still waiting (as gc would)
                kill_sandbox(info.id, node_dir)
        cluster.close()
        assert cluster.leftovers() == []
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in vmms) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in vmms if os.path.exists(f"/proc/{p}")] == []
