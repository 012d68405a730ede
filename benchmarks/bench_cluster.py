"""The cluster server (``serve --ray``) over Ray nodes in network namespaces on this
machine (``tests/ray_cluster.py``). Needs root and the ray extra. Two modes:

- ``scale`` (default): N sandboxes over K nodes, simulated with the in-process provider
  (the real agent, no VM), through the real HTTP API (``tests/cluster_scale.py``):
  creates per second, placement decisions per second, the server's memory per sandbox,
  and whether any node went over its slots or any sandbox was lost or listed twice.
- ``latency``: real VMs (the python template). Create -> first output of ``echo`` through
  the cluster server (two nodes) against a single-host server on this machine, the two
  interleaved round by round (p50/p95 and the ratio); then a node with sandboxes is
  SIGKILLed and the time until its sandboxes are ``lost`` is measured (``--kills`` times,
  a new node joining for each).

    .venv/bin/python benchmarks/bench_cluster.py [--sandboxes 1000] [--slots 200,250,300,300]
        [--parallel 16] [--out FILE]
    .venv/bin/python benchmarks/bench_cluster.py --mode latency [--rounds 20] [--kills 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster_scale import run_scale
from tests.ray_cluster import RayCluster
from tests.server_support import Server, make_key


def reap_nodes(nodes: Path) -> None:
    """Release what sandboxes of killed nodes left on this host (records, cgroups)."""
    from novasandbox.gc import kill_sandbox
    from novasandbox.records import list_sandboxes

    for node_dir in sorted(nodes.glob("node-*")):
        for info in list_sandboxes(node_dir):
            kill_sandbox(info.id, node_dir)


def pcts(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    return {
        "p50": round(v[len(v) // 2], 1),
        "p95": round(v[min(len(v) - 1, int(0.95 * len(v)))], 1),
        "n": len(v),
    }


def first_output_ms(url: str, key: str) -> float:
    from novasandbox import Sandbox

    t0 = time.monotonic()
    seen: list[float] = []
    sb = Sandbox.create("python", server=url, api_key=key)
    try:
        sb.commands.run("echo hi", on_stdout=lambda _t: seen.append(time.monotonic()))
    finally:
        sb.kill()
    return 1000 * (seen[0] - t0)


def run_latency(rounds: int, kills: int) -> dict[str, Any]:
    cluster = RayCluster(2, slots=4)
    single_state = Path(tempfile.mkdtemp(prefix="nsbs-", dir="/tmp"))
    servers: list[Server] = []
    try:
        state = cluster.root / "server"
        state.mkdir()
        key = make_key(state, "bench")
        clustered = Server(
            state,
            "--ray",
            cluster.address,
            "--ray-node-ip",
            cluster.head_address,
            "--node-state-dir",
            str(cluster.root / "nodes"),
            log=cluster.root / "server.log",
        )
        servers.append(clustered)
        single_key = make_key(single_state, "bench")
        single = Server(single_state, log=Path(f"{single_state}.log"))
        servers.append(single)
        for url, k in ((clustered.url, key), (single.url, single_key)):
            first_output_ms(url, k)  # untimed: first creates warm each path
        through_cluster: list[float] = []
        one_host: list[float] = []
        for _ in range(rounds):
            through_cluster.append(first_output_ms(clustered.url, key))
            one_host.append(first_output_ms(single.url, single_key))
        from novasandbox import Sandbox

        lost_after: list[float] = []
        headers = {"Authorization": f"Bearer {key}"}
        for i in range(kills):
            victim = cluster.nodes[-1]
            with httpx.Client(base_url=clustered.url, headers=headers) as c:
                deadline = time.monotonic() + 120
                while True:
                    nodes = {n["address"]: n for n in c.get("/v1/cluster").json()["nodes"]}
                    if nodes.get(victim.address, {}).get("state") == "ready":
                        break
                    assert time.monotonic() < deadline, "node not attached"
                    time.sleep(0.2)
                node_id = nodes[victim.address]["node_id"]
                made = []
                while not any(sb.node == node_id for sb in made):
                    made.append(Sandbox.create("python", server=clustered.url, api_key=key))
                killed = cluster.kill_node(len(cluster.nodes) - 1)
                ids = [sb.id for sb in made if sb.node == node_id]
                while True:
                    listed = {s["id"]: s for s in c.get("/v1/sandboxes").json()["sandboxes"]}
                    if all(listed[x]["state"] == "lost" for x in ids):
                        lost_after.append(1000 * (time.monotonic() - killed))
                        break
                    assert time.monotonic() - killed < 60, "loss not noticed"
                    time.sleep(0.02)
                for sb in made:
                    sb.kill()
            if i + 1 < kills:
                cluster.add_node(4)
        c50, s50 = pcts(through_cluster)["p50"], pcts(one_host)["p50"]
        return {
            "create_to_first_output_ms": {
                "cluster": pcts(through_cluster),
                "single_host": pcts(one_host),
                "ratio_p50": round(c50 / s50, 2),
            },
            "node_lost_after_ms": pcts(lost_after) | {"each": [round(x) for x in lost_after]},
        }
    finally:
        for server in servers:
            server.close()
        reap_nodes(cluster.root / "nodes")
        cluster.close()
        shutil.rmtree(single_state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--slots", default="200,250,300,300", help="each node's slots")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=["scale", "latency"], default="scale")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.mode == "latency":
        report = {
            "benchmark": "cluster_latency",
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **run_latency(args.rounds, args.kills),
        }
        out = args.out or Path("benchmarks/results") / f"bench-cluster-latency-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    slots = [int(x) for x in args.slots.split(",")]
    result = run_scale(args.sandboxes, slots, args.parallel)
    report = {
        "benchmark": "cluster_scale",
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "provider": "inprocess",
        "parallel": args.parallel,
        **result.figures(),
        "over_slots": {
            n: c for n, c in result.per_node.items() if c > result.slots_by_node.get(n, 0)
        },
    }
    out = args.out or Path("benchmarks/results") / f"bench-cluster-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    refused = all('"no-capacity"' in e for e in result.errors)  # beyond the slots: right
    intact = result.listed == result.listed_unique == len(result.created) and not result.lost
    return 0 if refused and intact and not report["over_slots"] else 1


if __name__ == "__main__":
    sys.exit(main())
