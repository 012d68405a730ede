"""The cluster server's view of its nodes and of where each sandbox runs.

- **Nodes** are found in Ray (``ray.nodes()``: alive, with a ``novasandbox`` resource)
  every ``DISCOVER_EVERY`` seconds; each gets its node agent (``node.py``), found by name
  or started, and a ``NodeLoad`` for placement (its slots are its ``novasandbox``
  resource; its vCPUs are the host's times ``vcpu_overcommit``; its memory the host's
  less ``memory_reserve_mib``, times ``memory_overcommit``).
- **Lost nodes.** A node is lost the moment Ray fails the ``wait_dead`` call kept
  pending on its agent (the agent's process died), when Ray reports its node dead, or
  when its server has not answered a health check for ``node_timeout`` seconds (checked
  every ``HEALTH_EVERY``). Its sandboxes turn ``lost``: every call on them raises
  ``SandboxLost`` naming the node; they stay listed for ``ENDED_KEPT`` seconds. A lost
  node that answers again is taken back: the sandboxes it still holds that were
  declared lost are killed there (nobody can reach them any more), and it takes new
  sandboxes again.
- **Routing** (sandbox id -> node, owner) is rebuilt from the nodes: whose a sandbox is
  lives on its node (the ``novasandbox.owner`` label), so a restarted server loses
  nothing by starting empty.
- **Draining** a node: no new sandboxes there; the ones it has run out their lifetime.
  A draining node with no sandbox left that goes (``ray stop`` there) is removed: it
  leaves the list at once instead of being listed lost.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..errors import (
    ConfigError,
    NoCapacity,
    NovaSandboxError,
    SandboxLost,
    SandboxNotFound,
    ServerUnreachable,
    SnapshotNotFound,
)
from ..remote import Server, _Http, error_of
from ..results import SandboxState
from ..server.registry import ShuttingDown
from .node import NAMESPACE, OWNER_LABEL, NodeConfig, actor_name, remote_class
from .placement import Capacity, NodeLoad, NodeState, Reservation, Shape, place

log = logging.getLogger("novasandbox.cluster")

RESOURCE = "novasandbox"
"""The Ray resource a node advertises to take sandboxes (its value: how many)."""
DISCOVER_EVERY = 1.0
HEALTH_EVERY = 0.2
HEALTH_TIMEOUT = 0.5
REFRESH_EVERY = 2.0
"""Seconds between two reads of every node's sandbox list (states, lifetimes)."""
NODE_START_WAIT = 120.0
REATTACH_AFTER = 30.0
"""Seconds a node whose agent died stays lost before a new agent is started there (if
Ray still says the node lives: by then Ray has noticed a node that is gone)."""
ENDED_KEPT = 600.0
ENDED = ("killed", "crashed", "error", "lost")


@dataclass
class Node:
    node_id: str
    actor: Any
    load: NodeLoad
    url: str = ""
    address: str = ""
    http: _Http | None = None
    last_ok: float = field(default_factory=time.monotonic)
    lost_reason: str | None = None
    lost_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    lost_event: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while it is lost: streams relayed from it end then."""
    making: dict[int, float] = field(default_factory=dict)
    """Creates, restores and forks on their way to it: {token: when they started}."""
    unrouted: dict[str, float] = field(default_factory=dict)
    """Sandboxes of an owner that it listed and nobody routed: {id: when first listed}
    (``refresh``: orphans of a create whose reply was lost)."""

    @property
    def state(self) -> NodeState:
        return self.load.state

    def to_json(self) -> dict[str, Any]:
        load = self.load
        return {
            "node_id": self.node_id,
            "address": self.address,
            "state": load.state.value,
            "lost_reason": self.lost_reason,
            "capacity": {
                "slots": load.capacity.slots,
                "vcpus": load.capacity.vcpus,
                "memory_mib": load.capacity.memory_mib,
            },
            "used": {
                "sandboxes": load.sandboxes,
                "vcpus": load.vcpus,
                "memory_mib": load.memory_mib,
            },
            "templates": sorted(load.templates),
            "building": self.info.get("building"),
            "build_errors": self.info.get("build_errors") or {},
            "pools": self.info.get("pools") or {},
        }


@dataclass
class Routed:
    """One sandbox of the cluster: where it runs, whose it is, what its node last said."""

    id: str
    node_id: str
    owner: str
    info: dict[str, Any]
    """The node's description of it (``SandboxOut``), ``node`` added, the owner label
    taken out."""
    shape: Shape
    lost: str | None = None
    """Why it is lost (its node was), or None."""
    ended_at: float = 0.0

    @property
    def state(self) -> str:
        return "lost" if self.lost else str(self.info.get("state", "running"))

    def to_json(self) -> dict[str, Any]:
        out = dict(self.info)
        out["node"] = self.node_id
        if self.lost:
            out["state"] = "lost"
            out["crash_reason"] = self.lost
        return out

    def lost_error(self) -> SandboxLost:
        return SandboxLost(f"sandbox {self.id} was lost with its node: {self.lost}", self.node_id)


@dataclass
class SnapRoute:
    """One snapshot made through the cluster: the node that keeps its files, whose it
    is, what its node said of it (``SnapshotOut``)."""

    id: str
    node_id: str
    owner: str
    info: dict[str, Any]

    @property
    def shape(self) -> Shape:
        return Shape(int(self.info.get("vcpus", 1)), int(self.info.get("memory_mib", 0)))


def _public(info: Mapping[str, Any]) -> dict[str, Any]:
    """A node's description of a sandbox as its owner sees it (no owner label)."""
    out = dict(info)
    out["labels"] = {k: v for k, v in dict(info.get("labels") or {}).items() if k != OWNER_LABEL}
    return out


class ClusterRegistry:
    """The sandboxes of a Ray cluster's nodes, by id, with their owner and node."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        k: int = 2,
        node_timeout: float = 1.5,
        vcpu_overcommit: float = 4.0,
        memory_overcommit: float = 1.0,
        memory_reserve_mib: int = 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or NodeConfig()
        self.k = k
        self.node_timeout = node_timeout
        self.vcpu_overcommit = vcpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.memory_reserve_mib = memory_reserve_mib
        self.rng = rng or random.Random()
        self.nodes: dict[str, Node] = {}
        self.routes: dict[str, Routed] = {}
        self.snapshots: dict[str, SnapRoute] = {}
        self._removed: dict[str, float] = {}
        """Nodes removed (drained, empty, gone): node id -> when."""
        self._making = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._attaching: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self.placements = 0
        """Placement decisions made (successful ones)."""
        self.placement_seconds = 0.0
        """Time spent deciding them (the pure part)."""
        self.pools = ClusterPools(self)

    def metrics_into(self, registry: CollectorRegistry) -> None:
        """Add the per-node gauges (label ``node``) to a metrics registry."""
        registry.register(_NodeMetrics(self))

    # --- nodes

    async def start(self) -> None:
        """Find the nodes (waiting for the first round of node agents), then keep
        watching."""
        await self.discover()
        if self._attaching:
            await asyncio.gather(*self._attaching.values(), return_exceptions=True)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._every(DISCOVER_EVERY, self.discover)),
            loop.create_task(self._every(REFRESH_EVERY, self.refresh)),
        ]

    async def _every(self, seconds: float, job: Any) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("cluster upkeep failed", extra={"fields": {"job": job.__name__}})

    async def discover(self) -> None:
        """Attach every alive Ray node with a ``novasandbox`` resource; lose the ones Ray
        says are dead."""
        import ray

        found = await asyncio.to_thread(ray.nodes)
        for entry in found:
            node_id = str(entry.get("NodeID", ""))
            slots = int(entry.get("Resources", {}).get(RESOURCE, 0) or 0)
            if not node_id:
                continue
            node = self.nodes.get(node_id)
            if not entry.get("Alive"):
                if node is not None and node.state is not NodeState.LOST:
                    self._lose(node, "Ray reports its node dead")
                continue
            if slots <= 0 or self._closing:
                continue
            removed = self._removed.get(node_id)
            if node is None and removed is not None and time.time() - removed < REATTACH_AFTER:
                continue  # drained and gone (Ray may not have noticed yet)
            replace = (
                node is not None
                and node.state is NodeState.LOST
                and node.tasks
                and node.tasks[0].done()
                and time.time() - node.lost_at > REATTACH_AFTER
            )
            # its agent died and Ray still says its node lives: a new agent (the node
            # stays listed lost until it answers; what the old agent left is killed)
            if (node is None or replace) and node_id not in self._attaching:
                task = asyncio.get_running_loop().create_task(self._attach(node_id, slots))
                self._attaching[node_id] = task
                task.add_done_callback(self._attached(node_id))

    def _attached(self, node_id: str) -> Any:
        def done(_task: asyncio.Task[None]) -> None:
            self._attaching.pop(node_id, None)

        return done

    async def _attach(self, node_id: str, slots: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = actor_name(node_id)

        def find_or_start() -> tuple[Any, bool]:  # Ray's control calls block: a thread
            try:
                return ray.get_actor(name, namespace=NAMESPACE), True
            except ValueError:
                options = remote_class().options(
                    name=name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )
                return options.remote(self.config.to_json()), False

        actor, found = await asyncio.to_thread(find_or_start)
        try:
            info: dict[str, Any] = await asyncio.wait_for(actor.info.remote(), NODE_START_WAIT)
        except Exception as exc:
            log.error(
                "node agent did not start",
                extra={"fields": {"node": node_id, "error": f"{type(exc).__name__}: {exc}"}},
            )
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ray.kill, actor)
            return
        load = NodeLoad(node_id, Capacity(slots, 0, 0), state=NodeState.STARTING)
        node = Node(node_id, actor, load)
        self._apply_info(node, info)
        try:
            await asyncio.wait_for(self._take_sandboxes(node), NODE_START_WAIT)
        except Exception as exc:  # tried again at the next discovery
            log.error(
                "node not attached: its sandboxes could not be read",
                extra={"fields": {"node": node_id, "error": f"{type(exc).__name__}: {exc}"}},
            )
            if node.http is not None:
                await node.http.aclose()
            return
        old = self.nodes.get(node_id)
        if old is not None:  # the agent before it died
            for task in old.tasks:
                task.cancel()
            if old.http is not None:
                await old.http.aclose()
        self.nodes[node_id] = node
        if self._closing:
            return
        node.load.state = NodeState.DRAINING if info.get("draining") else NodeState.READY
        node.last_ok = time.monotonic()
        loop = asyncio.get_running_loop()
        node.tasks = [
            loop.create_task(self._watch_death(node)),
            loop.create_task(self._health(node)),
        ]
        log.info(
            "node attached",
            extra={
                "fields": {
                    "node": node_id,
                    "url": node.url,
                    "found": found,
                    "slots": slots,
                    "templates": sorted(node.load.templates),
                    "sandboxes": node.load.sandboxes,
                }
            },
        )

    def _apply_info(self, node: Node, info: dict[str, Any]) -> None:
        node.info = {k: v for k, v in info.items() if k != "key"}
        node.address = str(info.get("address", ""))
        url = str(info["url"])
        if node.http is None or node.url != url:
            old = node.http
            node.http = _Http(Server(url, str(info["key"])))
            node.url = url
            if old is not None:
                asyncio.get_running_loop().create_task(old.aclose())
        cap = node.load.capacity
        node.load.capacity = Capacity(
            cap.slots,
            max(1, int(int(info.get("cpus", 1)) * self.vcpu_overcommit)),
            max(
                0,
                int(
                    (int(info.get("memory_mib", 0)) - self.memory_reserve_mib)
                    * self.memory_overcommit
                ),
            ),
        )
        node.load.templates = {
            name: Shape(int(s["vcpus"]), int(s["memory_mib"]))
            for name, s in dict(info.get("templates", {})).items()
        }

    async def _take_sandboxes(self, node: Node) -> None:
        """Route what the node runs (a restarted server; a node back after being lost:
        what it runs that was declared lost is killed there)."""
        listed = await self._node_list(node)
        for d in listed:
            sid = str(d["id"])
            owner = dict(d.get("labels") or {}).get(OWNER_LABEL)
            known = self.routes.get(sid)
            if owner is None or (known is not None and known.lost):
                await self._kill_on(node, sid)
                continue
            if str(d.get("state")) in ENDED:
                continue
            shape = Shape(int(d.get("vcpus", 1)), int(d.get("memory_mib", 0)))
            if known is None:
                self.routes[sid] = Routed(sid, node.node_id, owner, _public(d), shape)
                node.load.hold(shape)
            else:
                known.info = _public(d)
        try:
            await self._take_snapshots(node)
        except Exception as exc:  # its snapshots unlisted; its sandboxes still served
            log.error(
                "node snapshots not read",
                extra={"fields": {"node": node.node_id, "error": f"{type(exc).__name__}: {exc}"}},
            )
        log.debug("node sandboxes routed", extra={"fields": {"node": node.node_id}})

    async def _take_snapshots(self, node: Node) -> None:
        """Route the snapshots a node keeps that were made through the cluster (whose
        they are: the node's ``snapshot_owners``)."""
        assert node.http is not None
        owners: dict[str, str] = await node.actor.snapshot_owners.remote()
        reply = await node.http.call("GET", "/v1/snapshots")
        kept = {str(d["id"]): d for d in reply["snapshots"]}
        for sid in [s for s, r in self.snapshots.items() if r.node_id == node.node_id]:
            if sid not in kept:
                self.snapshots.pop(sid, None)
        for sid, d in kept.items():
            owner = owners.get(sid)
            if owner is not None:
                self.snapshots[sid] = SnapRoute(sid, node.node_id, owner, dict(d))

    async def _kill_on(
        self, node: Node, sandbox_id: str, why: str = "its node came back after it was lost"
    ) -> None:
        assert node.http is not None
        with contextlib.suppress(NovaSandboxError, TimeoutError):
            await asyncio.wait_for(node.http.call("DELETE", f"/v1/sandboxes/{sandbox_id}"), 30)
        log.info(
            "unreachable sandbox killed on its node",
            extra={"fields": {"node": node.node_id, "sandbox": sandbox_id, "why": why}},
        )

    def _orphan(self, node: Node, described: Mapping[str, Any], listed_at: float) -> bool:
        """Whether a sandbox that ``node`` lists and nobody routes is an orphan: one of
        an owner, still running, already listed unrouted in an earlier round, and no
        create, restore or fork to the node that began before that round is still on
        its way (so the one that made it is over, and its reply was lost: its client was
        told it failed). Such a sandbox is killed (nobody can reach it)."""
        sid = str(described["id"])
        if OWNER_LABEL not in dict(described.get("labels") or {}):
            return False
        if str(described.get("state")) in ENDED:
            return False
        first = node.unrouted.setdefault(sid, listed_at)
        if first == listed_at:
            return False
        return all(started > first for started in node.making.values())

    @contextlib.contextmanager
    def _on_its_way(self, node: Node) -> Iterator[None]:
        """A create, restore or fork sent to ``node`` (what ``_orphan`` waits for)."""
        self._making += 1
        token = self._making
        node.making[token] = time.monotonic()
        try:
            yield
        finally:
            node.making.pop(token, None)

    async def _node_list(self, node: Node) -> list[dict[str, Any]]:
        assert node.http is not None
        reply = await node.http.call("GET", "/v1/sandboxes")
        return list(reply["sandboxes"])

    async def _watch_death(self, node: Node) -> None:
        try:
            await node.actor.wait_dead.remote()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lose(node, f"its node agent died ({type(exc).__name__})")

    async def _health(self, node: Node) -> None:
        assert node.http is not None
        import httpx

        client = httpx.AsyncClient(timeout=HEALTH_TIMEOUT)
        try:
            while True:
                await asyncio.sleep(HEALTH_EVERY)
                try:
                    r = await client.get(node.url + "/healthz")
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                now = time.monotonic()
                if ok:
                    node.last_ok = now
                    if node.state is NodeState.LOST and not self._closing:
                        try:
                            await asyncio.wait_for(self._back(node), 30)
                        except Exception as exc:  # tried again at the next answer
                            log.error(
                                "a lost node answers but could not be taken back",
                                extra={"fields": {"node": node.node_id, "error": repr(exc)}},
                            )
                elif node.state is not NodeState.LOST and now - node.last_ok > self.node_timeout:
                    self._lose(node, f"its server did not answer for {now - node.last_ok:.1f} s")
        finally:
            await client.aclose()

    def _lose(self, node: Node, reason: str) -> None:
        if node.state is NodeState.LOST:
            return
        if node.state is NodeState.DRAINING and not any(
            r.node_id == node.node_id and r.state not in ENDED for r in self.routes.values()
        ):  # drained and empty, then gone: removed (nothing was lost)
            self._drop(node)
            self._removed[node.node_id] = time.time()
            log.info("node removed", extra={"fields": {"node": node.node_id, "why": reason}})
            return
        node.load.state = NodeState.LOST
        node.lost_event.set()
        node.lost_reason = reason
        node.lost_at = time.time()
        lost = [r for r in self.routes.values() if r.node_id == node.node_id and not r.lost]
        for routed in lost:
            routed.lost = f"node {node.node_id} was lost: {reason}"
            routed.ended_at = time.time()
        node.load.sandboxes = node.load.vcpus = node.load.memory_mib = 0
        log.warning(
            "node lost",
            extra={"fields": {"node": node.node_id, "reason": reason, "sandboxes": len(lost)}},
        )

    async def _back(self, node: Node) -> None:
        """A lost node answers again: take it back (if its agent is the same one). Every
        sandbox it still runs was declared lost (and maybe killed by its owner since):
        all of them are killed there."""
        try:
            info = await asyncio.wait_for(node.actor.info.remote(), 10)
        except Exception:
            return  # its agent died: a new one is attached by discovery
        self._apply_info(node, info)
        for d in await self._node_list(node):
            await self._kill_on(node, str(d["id"]))
        if node.state is not NodeState.LOST or not node.tasks or node.tasks[0].done():
            return  # taken back meanwhile, or its agent died
        node.load.sandboxes = node.load.vcpus = node.load.memory_mib = 0
        node.lost_reason = None
        node.lost_event.clear()
        node.load.state = NodeState.DRAINING if info.get("draining") else NodeState.READY
        log.warning("node back", extra={"fields": {"node": node.node_id}})

    async def refresh(self) -> None:
        """Read every node's sandboxes: states and lifetimes as they are there; forget
        the ended ones after a while."""
        for node in list(self.nodes.values()):
            if node.state is NodeState.LOST:
                if node.tasks and node.tasks[0].done() and time.time() - node.lost_at > ENDED_KEPT:
                    self._drop(node)
                continue
            # a sandbox routed while the list is on its way is not in it: judged next time
            routed_before = {r.id for r in self.routes.values() if r.node_id == node.node_id}
            try:
                info: dict[str, Any] = await asyncio.wait_for(node.actor.info.remote(), 5.0)
                listed = await asyncio.wait_for(self._node_list(node), 5.0)
            except Exception:  # a node that does not answer: its health check decides
                continue
            # what made a sandbox in the list began before this (``_orphan``)
            listed_at = time.monotonic()
            if self._is_lost(node) or self.nodes.get(node.node_id) is not node:
                continue  # lost or removed while we waited
            self._apply_info(node, info)
            node.load.state = NodeState.DRAINING if info.get("draining") else NodeState.READY
            seen: set[str] = set()
            orphans: list[str] = []
            for d in listed:
                routed = self.routes.get(str(d["id"]))
                if routed is None:
                    if self._orphan(node, d, listed_at):
                        orphans.append(str(d["id"]))
                    continue
                node.unrouted.pop(routed.id, None)
                if routed.node_id != node.node_id:
                    continue
                seen.add(routed.id)
                self.observe(routed, d)
            listed_ids = {str(d["id"]) for d in listed}
            for sid in [s for s in node.unrouted if s not in listed_ids]:
                node.unrouted.pop(sid, None)
            for sid in orphans:
                node.unrouted.pop(sid, None)
                await self._kill_on(node, sid, "orphan: its create's reply never came back")
            for routed in [r for r in self.routes.values() if r.id in routed_before]:
                if routed.node_id == node.node_id and routed.id not in seen and not routed.lost:
                    # the node forgot it (ended long ago, or killed there)
                    if routed.state not in ENDED:
                        node.load.release(routed.shape)
                    self.routes.pop(routed.id, None)
        now = time.time()
        for routed in list(self.routes.values()):
            if routed.state in ENDED and routed.ended_at and now - routed.ended_at > ENDED_KEPT:
                self.routes.pop(routed.id, None)

    def observe(self, routed: Routed, described: Mapping[str, Any]) -> None:
        """Take what its node says of a sandbox (its description): the one place where a
        sandbox's state changes, so its share of the node is released exactly once."""
        before = routed.state
        routed.info = _public(described)
        if routed.state in ENDED and before not in ENDED:
            routed.ended_at = time.time()
            node = self.nodes.get(routed.node_id)
            if node is not None and not routed.lost:
                node.load.release(routed.shape)

    @staticmethod
    def _is_lost(node: Node) -> bool:
        return node.state is NodeState.LOST

    def _drop(self, node: Node) -> None:
        for task in node.tasks:
            task.cancel()
        self.nodes.pop(node.node_id, None)
        if node.http is not None:
            asyncio.get_running_loop().create_task(node.http.aclose())

    def node(self, node_id: str) -> Node:
        node = self.nodes.get(node_id)
        if node is None:
            matches = [n for n in self.nodes.values() if n.node_id.startswith(node_id)]
            if len(matches) != 1:
                raise ConfigError(f"no cluster node {node_id!r}")
            node = matches[0]
        return node

    async def drain(self, node_id: str, draining: bool = True) -> Node:
        node = self.node(node_id)
        await node.actor.set_draining.remote(draining)
        if node.state is not NodeState.LOST:
            node.load.state = NodeState.DRAINING if draining else NodeState.READY
        log.info(
            "node draining" if draining else "node undrained",
            extra={"fields": {"node": node.node_id}},
        )
        return node

    # --- sandboxes

    async def create(self, owner: str, labels: Mapping[str, str], body: dict[str, Any]) -> Routed:
        """A new sandbox for ``owner`` (the API's create ``body``) on the node that
        placement chooses."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if OWNER_LABEL in labels:
            raise ConfigError(f"the label {OWNER_LABEL!r} is the server's own")
        if body.get("snapshot") is not None:
            return await self._restore(owner, labels, body)
        template = str(body.get("template") or "python")
        shape = None
        if body.get("vcpus") is not None or body.get("memory_mib") is not None:
            # a partial shape: the other half is the template's default, on any node
            default = next(
                (
                    n.load.templates[template]
                    for n in self.nodes.values()
                    if template in n.load.templates
                ),
                Shape(1, 256),
            )
            shape = Shape(
                int(body.get("vcpus") or default.vcpus),
                int(body.get("memory_mib") or default.memory_mib),
            )
        t0 = time.perf_counter()
        reservation = place(
            [n.load for n in self.nodes.values()], template, shape, k=self.k, rng=self.rng
        )
        self.placement_seconds += time.perf_counter() - t0
        self.placements += 1
        return await self._make_on(
            self.nodes[reservation.node_id], reservation, owner, labels, body
        )

    async def _make_on(
        self,
        node: Node,
        reservation: Reservation,
        owner: str,
        labels: Mapping[str, str],
        body: dict[str, Any],
    ) -> Routed:
        """Create the sandbox ``body`` asks for on ``node``, where ``reservation`` holds
        its share (released if it fails)."""
        try:
            assert node.http is not None
            with self._on_its_way(node):
                reply = await node.http.call(
                    "POST",
                    "/v1/sandboxes",
                    json={**body, "labels": {**labels, OWNER_LABEL: owner}},
                )
        except BaseException as exc:
            node.load.release(reservation.shape)
            if isinstance(exc, ServerUnreachable):
                raise error_of(
                    "sandbox-lost", f"the node chosen for it ({node.node_id}) did not answer: {exc}"
                ) from exc
            raise
        return self._route(node, reservation, reply, owner)

    def _hold_on(self, node: Node, shape: Shape, what: str) -> Reservation:
        """Hold ``shape`` on ``node`` itself (a snapshot's or a fork's sandbox runs where
        its files are), or ``NoCapacity`` saying why it cannot."""
        if node.state is NodeState.LOST:
            raise SandboxLost(
                f"{what} is on node {node.node_id}, which was lost: {node.lost_reason}",
                node.node_id,
            )
        why = node.load.no_room(shape)
        if why is not None:
            raise NoCapacity(f"{what} is on node {node.node_id[:12]}, which cannot take it: {why}")
        node.load.hold(shape)
        return Reservation(node.node_id, shape)

    async def _restore(self, owner: str, labels: Mapping[str, str], body: dict[str, Any]) -> Routed:
        """A sandbox restored from one of ``owner``'s snapshots, on the node that keeps it."""
        snap = self.get_snapshot(owner, str(body["snapshot"]))
        node = self.nodes.get(snap.node_id)
        if node is None:
            raise SnapshotNotFound(f"no snapshot {snap.id!r} (its node left the cluster)")
        reservation = self._hold_on(node, snap.shape, f"snapshot {snap.id}")
        return await self._make_on(node, reservation, owner, labels, body)

    async def fork(
        self, owner: str, sandbox_id: str, n: int, labels: Mapping[str, str] | None
    ) -> builtins.list[Routed]:
        """``n`` forks of ``owner``'s sandbox, on its node (their memory is its)."""
        if OWNER_LABEL in (labels or {}):
            raise ConfigError(f"the label {OWNER_LABEL!r} is the server's own")
        if not 1 <= n <= 64:
            raise ConfigError(f"n must be 1 to 64, got {n}")
        routed, node = self.live(owner, sandbox_id)
        held: list[Reservation] = []
        try:
            for _ in range(n):
                held.append(self._hold_on(node, routed.shape, f"sandbox {routed.id}"))
            own = dict(routed.info.get("labels") or {}) if labels is None else dict(labels)
            assert node.http is not None
            with self._on_its_way(node):
                reply = await node.http.call(
                    "POST",
                    f"/v1/sandboxes/{routed.id}/fork",
                    json={"n": n, "labels": {**own, OWNER_LABEL: owner}},
                )
        except BaseException:
            for reservation in held:
                node.load.release(reservation.shape)
            raise
        made = [dict(d) for d in reply["sandboxes"]]
        for reservation in held[len(made) :]:
            node.load.release(reservation.shape)
        return [self._route(node, r, d, owner) for r, d in zip(held, made, strict=False)]

    # --- snapshots (their files stay on the node that made them)

    async def snapshot(self, owner: str, sandbox_id: str) -> SnapRoute:
        routed, node = self.live(owner, sandbox_id)
        assert node.http is not None
        reply = await node.http.call("POST", f"/v1/sandboxes/{routed.id}/snapshot")
        snap = SnapRoute(str(reply["id"]), node.node_id, owner, dict(reply))
        try:
            await asyncio.wait_for(node.actor.set_snapshot_owner.remote(snap.id, owner), 30)
        except BaseException:  # whose it is could not be kept: it goes
            with contextlib.suppress(NovaSandboxError, TimeoutError):
                await asyncio.wait_for(node.http.call("DELETE", f"/v1/snapshots/{snap.id}"), 30)
            raise
        self.snapshots[snap.id] = snap
        log.info(
            "snapshot saved",
            extra={"fields": {"sandbox": sandbox_id, "snapshot": snap.id, "node": node.node_id}},
        )
        return snap

    def get_snapshot(self, owner: str, snapshot_id: str) -> SnapRoute:
        snap = self.snapshots.get(snapshot_id)
        if snap is None or snap.owner != owner:
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")
        return snap

    def list_snapshots(self, owner: str) -> builtins.list[SnapRoute]:
        """``owner``'s snapshots on the nodes that answer (oldest first)."""
        found = [
            s
            for s in list(self.snapshots.values())
            if s.owner == owner
            and (n := self.nodes.get(s.node_id)) is not None
            and n.state is not NodeState.LOST
        ]
        return sorted(found, key=lambda s: float(s.info.get("created_at", 0.0)))

    async def delete_snapshot(self, owner: str, snapshot_id: str) -> None:
        snap = self.get_snapshot(owner, snapshot_id)
        node = self.nodes.get(snap.node_id)
        if node is None or node.state is NodeState.LOST or node.http is None:
            raise SandboxLost(
                f"snapshot {snap.id} is on node {snap.node_id}, which was lost", snap.node_id
            )
        with contextlib.suppress(SnapshotNotFound):
            await node.http.call("DELETE", f"/v1/snapshots/{snap.id}")
        self.snapshots.pop(snap.id, None)  # its files are gone: whatever the record says
        await asyncio.wait_for(node.actor.set_snapshot_owner.remote(snap.id, None), 30)

    def _route(
        self, node: Node, reservation: Reservation, reply: dict[str, Any], owner: str
    ) -> Routed:
        actual = Shape(int(reply.get("vcpus", 1)), int(reply.get("memory_mib", 0)))
        if actual != reservation.shape:
            node.load.release(reservation.shape)
            node.load.hold(actual)
        routed = Routed(str(reply["id"]), node.node_id, owner, _public(reply), actual)
        self.routes[routed.id] = routed
        if node.state is NodeState.LOST:  # lost while we waited for it
            routed.lost = f"node {node.node_id} was lost: {node.lost_reason}"
        log.info(
            "sandbox placed",
            extra={"fields": {"sandbox": routed.id, "key": owner, "node": node.node_id}},
        )
        return routed

    def get(self, owner: str, sandbox_id: str) -> Routed:
        routed = self.routes.get(sandbox_id)
        if routed is None or routed.owner != owner:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        return routed

    def live(self, owner: str, sandbox_id: str) -> tuple[Routed, Node]:
        """``owner``'s sandbox and its node, or ``SandboxLost`` (its node was lost)."""
        routed = self.get(owner, sandbox_id)
        node = self.nodes.get(routed.node_id)
        if routed.lost or node is None or node.state is NodeState.LOST:
            if not routed.lost:
                routed.lost = f"node {routed.node_id} was lost"
            raise routed.lost_error()
        return routed, node

    def list(
        self,
        owner: str,
        labels: Mapping[str, str] | None = None,
        states: Sequence[str] = (),
    ) -> builtins.list[Routed]:
        found = []
        for routed in list(self.routes.values()):
            if routed.owner != owner:
                continue
            have = routed.info.get("labels") or {}
            if labels and any(have.get(k) != v for k, v in labels.items()):
                continue
            if states and routed.state not in states:
                continue
            found.append(routed)
        return sorted(found, key=lambda r: float(r.info.get("created_at", 0.0)))

    def states(self) -> Counter[SandboxState]:
        counts: Counter[SandboxState] = Counter()
        for routed in list(self.routes.values()):
            with contextlib.suppress(ValueError):
                counts[SandboxState(routed.state)] += 1
        return counts

    async def kill(self, owner: str, sandbox_id: str) -> None:
        routed = self.get(owner, sandbox_id)
        node = self.nodes.get(routed.node_id)
        if routed.lost or node is None or node.state is NodeState.LOST:
            self.routes.pop(sandbox_id, None)  # killed there if the node comes back
            return
        assert node.http is not None
        await node.http.call("DELETE", f"/v1/sandboxes/{sandbox_id}")
        if self.routes.pop(sandbox_id, None) is not None and routed.state not in ENDED:
            node.load.release(routed.shape)
        log.info("sandbox killed", extra={"fields": {"sandbox": sandbox_id, "key": owner}})

    async def close(self) -> None:
        """Stop watching (the node agents and their sandboxes go on: they are the
        cluster's, and a restarted server takes them back)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for node in list(self.nodes.values()):
            for task in node.tasks:
                task.cancel()
            if node.http is not None:
                await node.http.aclose()
        for task in list(self._attaching.values()):
            task.cancel()

    def status(self) -> builtins.list[dict[str, Any]]:
        return [n.to_json() for n in sorted(self.nodes.values(), key=lambda n: n.node_id)]

    def __len__(self) -> int:
        return len(self.routes)


class ClusterPools:
    """The nodes' warm pools as the server's metrics see them (sandboxes ready per
    template, all nodes together)."""

    def __init__(self, registry: ClusterRegistry) -> None:
        self._registry = registry

    def ready(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for node in self._registry.nodes.values():
            if node.state is not NodeState.LOST:
                total.update({str(k): int(v) for k, v in dict(node.info.get("pools", {})).items()})
        return dict(total)


class _NodeMetrics(Collector):
    """``novasandbox_node_*{node}``: each node's state, capacity and load, when scraped."""

    def __init__(self, registry: ClusterRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "novasandbox_node_up",
            "1 for a node that takes sandboxes (ready).",
            labels=["node", "state"],
        )
        sandboxes = GaugeMetricFamily(
            "novasandbox_node_sandboxes", "Sandboxes on a node, by state.", labels=["node", "state"]
        )
        capacity = GaugeMetricFamily(
            "novasandbox_node_capacity",
            "What a node offers sandboxes (slots, vcpus, memory_mib).",
            labels=["node", "resource"],
        )
        used = GaugeMetricFamily(
            "novasandbox_node_used",
            "What a node's sandboxes hold (slots, vcpus, memory_mib).",
            labels=["node", "resource"],
        )
        counts: Counter[tuple[str, str]] = Counter(
            (r.node_id, r.state) for r in list(self.registry.routes.values())
        )
        for node in list(self.registry.nodes.values()):
            load = node.load
            up.add_metric(
                [node.node_id, load.state.value], 1 if load.state is NodeState.READY else 0
            )
            for state in SandboxState:
                sandboxes.add_metric(
                    [node.node_id, state.value], counts.get((node.node_id, state.value), 0)
                )
            for name, have, held in (
                ("slots", load.capacity.slots, load.sandboxes),
                ("vcpus", load.capacity.vcpus, load.vcpus),
                ("memory_mib", load.capacity.memory_mib, load.memory_mib),
            ):
                capacity.add_metric([node.node_id, name], have)
                used.add_metric([node.node_id, name], held)
        yield from (up, sandboxes, capacity, used)


__all__ = ["RESOURCE", "ClusterRegistry", "Node", "Routed", "SnapRoute"]
