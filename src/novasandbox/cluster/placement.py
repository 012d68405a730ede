"""Where a new sandbox goes: pure placement over what the server knows of its nodes.

The policy (documented in the README, "Cluster"):

1. **Eligible nodes** are those that are ``ready`` (alive, not draining, not lost),
   have the sandbox's template built, and have room for it: a free slot (the node's
   ``novasandbox`` Ray resource), and the vCPUs and memory it asks for within what the
   node offers minus what its sandboxes (and creates in flight) already hold.
2. **Best of K**: K of the eligible nodes (default 2) are drawn at random and the one
   with the most free memory wins (ties: fewer sandboxes, then the first drawn). Drawing
   spreads load without every server racing to the one emptiest node; comparing two
   keeps the spread close to the best (the "power of two choices").
3. None eligible: ``NoCapacity``, naming why each node was passed over.

What a node holds is reserved here the moment it is chosen (``Reservation``) and
released if the create fails, so two creates placed at once cannot both take the last
slot of a node. Everything here is data in, decision out: no Ray, no I/O.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import NoCapacity

DEFAULT_K = 2


class NodeState(enum.StrEnum):
    STARTING = "starting"
    """Its node agent is being started: not placed on yet."""
    READY = "ready"
    DRAINING = "draining"
    """No new sandboxes; the ones it has run out their lifetime."""
    LOST = "lost"
    """Stopped answering (or its Ray node died): its sandboxes are lost."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What one sandbox holds of a node."""

    vcpus: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a node offers sandboxes."""

    slots: int
    vcpus: int
    memory_mib: int


@dataclass
class NodeLoad:
    """One node as placement sees it."""

    node_id: str
    capacity: Capacity
    templates: Mapping[str, Shape] = field(default_factory=dict)
    """The templates built there, with their default shapes."""
    state: NodeState = NodeState.READY
    sandboxes: int = 0
    vcpus: int = 0
    memory_mib: int = 0
    """What its sandboxes (and reservations) hold."""

    @property
    def free_memory_mib(self) -> int:
        return self.capacity.memory_mib - self.memory_mib

    def why_not(self, template: str, shape: Shape | None) -> str | None:
        """Why this node cannot take a sandbox of ``template`` with ``shape`` (None: the
        template's default), or None if it can."""
        if self.state is not NodeState.READY:
            return self.state.value
        default = self.templates.get(template)
        if default is None:
            return f"template {template!r} not built there"
        return self.no_room(shape or default)

    def no_room(self, need: Shape) -> str | None:
        """Why this node has no room for one more sandbox of ``need`` (None: it has),
        whatever its template (a snapshot's or a fork's sandbox runs where its files
        are)."""
        if self.state is not NodeState.READY:
            return self.state.value
        if self.sandboxes + 1 > self.capacity.slots:
            return f"all {self.capacity.slots} slots taken"
        if self.vcpus + need.vcpus > self.capacity.vcpus:
            return f"{self.capacity.vcpus - self.vcpus} vCPUs free, {need.vcpus} asked"
        if self.memory_mib + need.memory_mib > self.capacity.memory_mib:
            return f"{self.free_memory_mib} MiB free, {need.memory_mib} MiB asked"
        return None

    def hold(self, shape: Shape) -> None:
        self.sandboxes += 1
        self.vcpus += shape.vcpus
        self.memory_mib += shape.memory_mib

    def release(self, shape: Shape) -> None:
        self.sandboxes = max(0, self.sandboxes - 1)
        self.vcpus = max(0, self.vcpus - shape.vcpus)
        self.memory_mib = max(0, self.memory_mib - shape.memory_mib)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A place taken on a node for a sandbox being made (released if it fails)."""

    node_id: str
    shape: Shape


def place(
    nodes: Iterable[NodeLoad],
    template: str,
    shape: Shape | None = None,
    *,
    k: int = DEFAULT_K,
    rng: random.Random | None = None,
) -> Reservation:
    """Choose a node for a sandbox of ``template`` (``shape``: its vCPUs and memory;
    None: the template's default on the node) and hold its share there at once.
    ``NoCapacity`` when no node can take it."""
    nodes = list(nodes)
    eligible: list[NodeLoad] = []
    refused: list[str] = []
    for node in nodes:
        why = node.why_not(template, shape)
        if why is None:
            eligible.append(node)
        else:
            refused.append(f"{node.node_id[:12]}: {why}")
    if not eligible:
        if not nodes:
            raise NoCapacity("no cluster node is ready (none advertises a novasandbox resource)")
        raise NoCapacity(
            f"no cluster node can take a sandbox of {template!r} now ("
            + "; ".join(sorted(refused))
            + ")"
        )
    rng = rng or random.Random()
    draw = rng.sample(eligible, min(max(1, k), len(eligible)))
    # ties (equal free memory and load) go to the first drawn: at random, never by id
    best = max(draw, key=lambda n: (n.free_memory_mib, -n.sandboxes))
    need = shape or best.templates[template]
    best.hold(need)
    return Reservation(best.node_id, need)


__all__ = [
    "DEFAULT_K",
    "Capacity",
    "NodeLoad",
    "NodeState",
    "Reservation",
    "Shape",
    "place",
]
