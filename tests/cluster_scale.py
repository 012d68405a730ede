"""A thousand sandboxes over a Ray cluster, simulated: the in-process provider (the real
agent, no VM) on every node, the real cluster server, the real HTTP API. Used by
``tests/integration/test_cluster_scale.py`` (which checks the invariants) and
``benchmarks/bench_cluster.py`` (which reports the figures)."""

from __future__ import annotations

import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.ray_cluster import RayCluster
from tests.server_support import Server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class ScaleResult:
    sandboxes: int
    nodes: int
    slots: list[int]
    created: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    per_node: dict[str, int] = field(default_factory=dict)
    slots_by_node: dict[str, int] = field(default_factory=dict)
    listed: int = 0
    listed_unique: int = 0
    lost: int = 0
    ran: int = 0
    busy: int = 0
    """Creates answered server-busy (and retried)."""
    create_seconds: float = 0.0
    placements: int = 0
    placement_seconds: float = 0.0
    server_rss_before_mib: float = 0.0
    server_rss_after_mib: float = 0.0
    create_ms: list[float] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        ms = sorted(self.create_ms)

        def pct(p: float) -> float:
            return round(ms[min(len(ms) - 1, int(p * len(ms)))], 1) if ms else 0.0

        return {
            "sandboxes": self.sandboxes,
            "nodes": self.nodes,
            "created": len(self.created),
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "per_node": self.per_node,
            "slots_by_node": self.slots_by_node,
            "listed": self.listed,
            "listed_unique": self.listed_unique,
            "lost": self.lost,
            "busy_retries": self.busy,
            "commands_ok": self.ran,
            "creates_per_second": round(len(self.created) / self.create_seconds, 1)
            if self.create_seconds
            else 0.0,
            "create_ms_p50": pct(0.5),
            "create_ms_p95": pct(0.95),
            "placement_decisions": self.placements,
            "placement_decisions_per_second": round(self.placements / self.placement_seconds)
            if self.placement_seconds
            else 0,
            "placement_us_mean": round(1e6 * self.placement_seconds / self.placements, 1)
            if self.placements
            else 0.0,
            "server_rss_before_mib": round(self.server_rss_before_mib, 1),
            "server_rss_after_mib": round(self.server_rss_after_mib, 1),
            "server_kib_per_sandbox": round(
                1024 * (self.server_rss_after_mib - self.server_rss_before_mib) / self.sandboxes, 1
            )
            if self.sandboxes
            else 0.0,
        }


def run_scale(sandboxes: int, slots: list[int], parallel: int = 16) -> ScaleResult:
    """Start a cluster with a node per entry of ``slots``, a cluster server over it with
    the in-process provider, create ``sandboxes`` sandboxes through the API (``parallel``
    at a time), run a command in each, list them, kill them all, take it all down."""
    result = ScaleResult(sandboxes, len(slots), slots)
    env = {
        **os.environ,
        "NOVASANDBOX_PROVIDER": "inprocess",
        "NOVASANDBOX_ALLOW_INPROCESS": "1",
    }
    cluster = RayCluster(len(slots), node_slots=slots)
    server: Server | None = None
    try:
        server, key = cluster.serve(
            "--max-starting",
            str(parallel),
            "--vcpu-overcommit",  # no VM: the slots are the limit
            "1000",
            "--memory-overcommit",
            "100",
            env=env,
        )
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=300) as c:
            status = c.get("/v1/cluster").json()
            result.slots_by_node = {
                n["node_id"][:12]: n["capacity"]["slots"] for n in status["nodes"]
            }
            result.server_rss_before_mib = rss_mib(server.proc.pid)

            def create(_i: int) -> tuple[str | None, float, str]:
                t0 = time.monotonic()
                for _ in range(30):  # server-busy says: retry later (a loaded machine)
                    r = c.post("/v1/sandboxes", json={"template": "python", "timeout": None})
                    if r.status_code != 503 or '"server-busy"' not in r.text:
                        break
                    result.busy += 1
                    time.sleep(1.0)
                ms = 1000 * (time.monotonic() - t0)
                if r.status_code != 201:
                    return None, ms, f"{r.status_code} {r.text[:200]}"
                return str(r.json()["id"]), ms, ""

            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                for sid, ms, error in pool.map(create, range(sandboxes)):
                    if sid is None:
                        result.errors.append(error)
                    else:
                        result.created.append(sid)
                        result.create_ms.append(ms)
            result.create_seconds = time.monotonic() - t0

            def run(sid: str) -> bool:
                r = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": f"echo {sid}"})
                return r.status_code == 200 and sid in r.text and '"exit_code": 0' in r.text

            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                result.ran = sum(pool.map(run, result.created))
            listed = c.get("/v1/sandboxes").json()["sandboxes"]
            result.listed = len(listed)
            result.listed_unique = len({s["id"] for s in listed})
            result.lost = sum(1 for s in listed if s["state"] == "lost")
            for s in listed:
                node = str(s["node"])[:12]
                result.per_node[node] = result.per_node.get(node, 0) + 1
            status = c.get("/v1/cluster").json()
            result.placements = int(status["placement"]["decisions"])
            result.placement_seconds = float(status["placement"]["decision_seconds"])
            result.server_rss_after_mib = rss_mib(server.proc.pid)

            def kill(sid: str) -> int:
                return c.delete(f"/v1/sandboxes/{sid}").status_code

            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                codes = list(pool.map(kill, result.created))
            result.errors += [f"kill {code}" for code in codes if code != 204]
    finally:
        if server is not None:
            server.close()
        cluster.close()
    return result
