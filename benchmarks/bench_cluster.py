"""The cluster server (``serve --ray``) over Ray nodes in network namespaces on this
machine (``tests/ray_cluster.py``). Needs root and the ray extra. Three modes:

- ``scale`` (default): N sandboxes over K nodes, simulated with the in-process provider
  (the real agent, no VM), through the real HTTP API (``tests/cluster_scale.py``):
  creates per second, placement decisions per second, the server's memory per sandbox,
  and whether any node went over its slots or any sandbox was lost or listed twice.
- ``latency``: real VMs (the python template). Create -> first output of ``echo`` through
  the cluster server (two nodes) against a single-host server on this machine, the two
  interleaved round by round (p50/p95 and the ratio); then a node with sandboxes is
  SIGKILLed and the time until its sandboxes are ``lost`` is measured (``--kills`` times,
  a new node joining for each).
- ``vms``: real VMs (the python template, default shape) through the cluster server on
  ``--nodes`` nodes (slots and ``--vcpu-overcommit`` high enough not to be the limit),
  ramped up ``--step`` concurrent creates at a time, all kept alive. After each step: the
  step's create time, an ``echo hi`` round trip through the REST API on ``--probes`` live
  sandboxes, MemAvailable, load, host CPU busy, and the qemu-system processes' RSS/PSS.
  It stops at the first failed create (its error code), an echo p50 over
  ``--command-bound`` seconds, MemAvailable under ``--min-available`` MiB, or ``--max``
  alive: the ``saturation`` summary says where and why.

    .venv/bin/python benchmarks/bench_cluster.py [--sandboxes 1000] [--slots 200,250,300,300]
        [--parallel 16] [--out FILE]
    .venv/bin/python benchmarks/bench_cluster.py --mode latency [--rounds 20] [--kills 3]
    .venv/bin/python benchmarks/bench_cluster.py --mode vms [--nodes 2] [--step 2] [--max 40]
        [--command-bound 5] [--min-available 2048] [--vcpu-overcommit 32]
        [--memory-overcommit 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
        clustered, key = cluster.serve()
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
                made: list[Sandbox] = []
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


def meminfo_mib(name: str = "MemAvailable") -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) // 1024
    return 0


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def vmm_memory_mib(pids: list[int]) -> dict[str, float]:
    """Summed RSS and PSS (shared pages split among their users) of these processes."""
    kib = {"Rss": 0, "Pss": 0}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                name = line.split(":", 1)[0]
                if name in kib:
                    kib[name] += int(line.split()[1])
        except OSError:
            continue
    return {"rss_mib": round(kib["Rss"] / 1024), "pss_mib": round(kib["Pss"] / 1024)}


def error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http-{r.status_code}"


def vm_create(c: httpx.Client) -> dict[str, Any]:
    """One create of the python template (default shape, no lifetime) through the REST
    API: its time (ms) and id and node, or its error code (``timeout``: no answer within
    the client's timeout)."""
    t0 = time.monotonic()
    try:
        r = c.post("/v1/sandboxes", json={"template": "python", "timeout": None})
    except httpx.TimeoutException:
        return {"ms": 1000 * (time.monotonic() - t0), "error": "timeout"}
    except httpx.HTTPError as exc:
        return {"ms": 1000 * (time.monotonic() - t0), "error": type(exc).__name__}
    ms = 1000 * (time.monotonic() - t0)
    if r.status_code != 201:
        return {"ms": ms, "error": error_code(r), "message": r.text[:300]}
    body = r.json()
    return {"ms": ms, "id": body["id"], "node": body.get("node")}


def vm_echo(c: httpx.Client, sandbox_id: str) -> tuple[float, str | None]:
    """``echo hi`` in the sandbox through the REST API (the NDJSON stream read to its
    ``exit``): the round trip (ms), and an error code or None."""
    t0 = time.monotonic()
    out, ended, error = "", None, None
    try:
        cmd = {"cmd": "echo hi"}
        with c.stream("POST", f"/v1/sandboxes/{sandbox_id}/commands", json=cmd) as r:
            if r.status_code != 200:
                r.read()
                return 1000 * (time.monotonic() - t0), error_code(r)
            for line in r.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "stdout":
                    out += event["data"]
                elif event["type"] == "exit":
                    ended = event
                elif event["type"] == "error":
                    error = str(event["error"]["code"])
    except httpx.TimeoutException:
        error = "timeout"
    except httpx.HTTPError as exc:
        error = type(exc).__name__
    ms = 1000 * (time.monotonic() - t0)
    if error is None and (ended is None or ended["exit_code"] != 0 or out.strip() != "hi"):
        error = f"bad-result: {ended} {out!r}"
    return ms, error


def run_vms(
    nodes: int,
    slots: int,
    step: int,
    max_alive: int,
    probes: int,
    command_bound_s: float,
    min_available_mib: int,
    vcpu_overcommit: float,
    create_timeout: float,
    settle_s: float,
    memory_overcommit: float = 1.0,
) -> dict[str, Any]:
    """Real VMs through the cluster server, ramped up ``step`` creates at a time (all
    made before kept alive) until a create fails, the command round trip's p50 passes
    ``command_bound_s``, MemAvailable falls under ``min_available_mib``, or ``max_alive``
    are alive; the figures after each step, and why it stopped."""
    from novasandbox.gc import vmm_pids_under

    result: dict[str, Any] = {
        "config": {
            "nodes": nodes,
            "slots_per_node": slots,
            "step": step,
            "max": max_alive,
            "probes": probes,
            "command_bound_s": command_bound_s,
            "min_available_mib": min_available_mib,
            "vcpu_overcommit": vcpu_overcommit,
            "memory_overcommit": memory_overcommit,
            "create_timeout_s": create_timeout,
            "settle_s": settle_s,
            "host_cpus": os.cpu_count(),
            "host_mem_total_mib": meminfo_mib("MemTotal"),
        }
    }
    cluster = RayCluster(nodes, slots=slots)
    nodes_root = cluster.root / "nodes"
    server: Server | None = None
    key = ""
    rng = random.Random(16)
    try:
        server, key = cluster.serve(
            "--vcpu-overcommit",
            str(vcpu_overcommit),
            "--memory-overcommit",
            str(memory_overcommit),
        )
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=create_timeout) as c:
            deadline = time.monotonic() + 300
            while True:  # every node attached, with the template
                listed = c.get("/v1/cluster").json()["nodes"]
                ready = [n for n in listed if n["state"] == "ready" and "python" in n["templates"]]
                if len(ready) == nodes:
                    break
                assert time.monotonic() < deadline, f"nodes not ready: {listed}"
                time.sleep(0.5)
            time.sleep(settle_s)
            base_available = meminfo_mib()
            result["baseline"] = {
                "mem_available_mib": base_available,
                "load1": round(os.getloadavg()[0], 2),
            }
            alive: list[dict[str, Any]] = []
            steps: list[dict[str, Any]] = []
            stop: dict[str, Any] = {}
            while not stop:
                n = min(step, max_alive - len(alive))
                with ThreadPoolExecutor(n) as pool:
                    made = list(pool.map(lambda _i: vm_create(c), range(n)))
                alive += [m for m in made if "id" in m]
                failed = [m for m in made if "error" in m]
                time.sleep(settle_s)
                busy0, total0 = cpu_ticks()
                picked = rng.sample(alive, min(probes, len(alive)))
                echoes = [vm_echo(c, m["id"]) for m in picked]
                busy1, total1 = cpu_ticks()
                pids = vmm_pids_under(nodes_root)
                available = meminfo_mib()
                vmm = vmm_memory_mib(pids)
                command = pcts([ms for ms, err in echoes if err is None])
                figures = {
                    "alive": len(alive),
                    "create_ms": pcts([m["ms"] for m in made if "id" in m]),
                    "create_errors": [
                        {k: v for k, v in m.items() if k != "ms"} | {"ms": round(m["ms"])}
                        for m in failed
                    ],
                    "command_ms": command,
                    "command_errors": [err for _ms, err in echoes if err is not None],
                    "mem_available_mib": available,
                    "load1": round(os.getloadavg()[0], 2),
                    "cpu_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
                    "qemu_processes": len(pids),
                    "qemu": vmm,
                    "per_sandbox_mib": {
                        "mem_available_drop": round((base_available - available) / len(alive))
                        if alive
                        else None,
                        "qemu_rss": round(vmm["rss_mib"] / len(pids)) if pids else None,
                        "qemu_pss": round(vmm["pss_mib"] / len(pids)) if pids else None,
                    },
                    "per_node": dict(Counter(str(m["node"]) for m in alive)),
                }
                steps.append(figures)
                print(json.dumps({"step": len(steps)} | figures), file=sys.stderr, flush=True)
                if failed:
                    codes = sorted({m["error"] for m in failed})
                    stop = {"reason": "create-failed", "codes": codes}
                elif figures["command_errors"]:
                    stop = {"reason": "command-failed", "codes": figures["command_errors"]}
                elif command and command["p50"] > 1000 * command_bound_s:
                    stop = {"reason": f"command-p50-over-{command_bound_s:g}s"}
                elif available < min_available_mib:
                    stop = {"reason": f"mem-available-under-{min_available_mib}-mib"}
                elif len(alive) >= max_alive:
                    stop = {"reason": "max-reached"}
            last = steps[-1]
            result["saturation"] = stop | {
                "alive": last["alive"],
                "create_p50_ms": last["create_ms"].get("p50"),
                "command_p50_ms": last["command_ms"].get("p50"),
                "mem_available_mib": last["mem_available_mib"],
                "load1": last["load1"],
                "per_sandbox_mib": last["per_sandbox_mib"],
                "by_step": [
                    {
                        "alive": s["alive"],
                        "create_p50_ms": s["create_ms"].get("p50"),
                        "command_p50_ms": s["command_ms"].get("p50"),
                        "mem_available_mib": s["mem_available_mib"],
                        "load1": s["load1"],
                        "cpu_busy_pct": s["cpu_busy_pct"],
                    }
                    for s in steps
                ],
            }
            result["steps"] = steps
        return result
    finally:
        if server is not None:
            headers = {"Authorization": f"Bearer {key}"}
            try:  # everything the server has, including creates that answered too late
                with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
                    ids = [s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]]
                    with ThreadPoolExecutor(4) as pool:
                        list(pool.map(lambda i: c.delete(f"/v1/sandboxes/{i}"), ids))
            except httpx.HTTPError as exc:
                print(f"cleanup: {exc!r}", file=sys.stderr)
            server.close()
        reap_nodes(nodes_root)
        cluster.close()
        left = vmm_pids_under(nodes_root)
        for pid in left:  # ours: their command lines name this cluster's folder
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        result["cleanup"] = {"qemu_left": left, "cluster_left": cluster.leftovers()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--slots", default="200,250,300,300", help="each node's slots")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=["scale", "latency", "vms"], default="scale")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3)
    vms = parser.add_argument_group("--mode vms")
    vms.add_argument("--nodes", type=int, default=2)
    vms.add_argument("--node-slots", type=int, default=32, help="each node's slots")
    vms.add_argument("--step", type=int, default=2, help="concurrent creates per step")
    vms.add_argument("--max", type=int, default=40, help="stop with this many alive")
    vms.add_argument("--probes", type=int, default=4, help="sandboxes echoed per step")
    vms.add_argument("--command-bound", type=float, default=5.0, help="stop: echo p50 (s)")
    vms.add_argument("--min-available", type=int, default=2048, help="stop: MemAvailable MiB")
    vms.add_argument("--vcpu-overcommit", type=float, default=32.0, help="serve's option")
    vms.add_argument(
        "--memory-overcommit",
        type=float,
        default=1.0,
        help="serve's option (the nodes of one machine each count all of its memory)",
    )
    vms.add_argument("--create-timeout", type=float, default=300.0, help="seconds")
    vms.add_argument("--settle", type=float, default=2.0, help="seconds after each step")
    args = parser.parse_args()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.mode == "vms":
        report = {
            "benchmark": "cluster_vms",
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **run_vms(
                args.nodes,
                args.node_slots,
                args.step,
                args.max,
                args.probes,
                args.command_bound,
                args.min_available,
                args.vcpu_overcommit,
                args.create_timeout,
                args.settle,
                args.memory_overcommit,
            ),
        }
        out = args.out or Path("benchmarks/results") / f"bench-cluster-vms-{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0 if report["cleanup"] == {"qemu_left": [], "cluster_left": []} else 1
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
