"""The cluster server's pure parts: placement over nodes (``cluster/placement.py``) and the
path a request is relayed to (``cluster/app.upstream_path``); no Ray."""

from __future__ import annotations

import random

import pytest

from novasandbox.cluster.placement import Capacity, NodeLoad, NodeState, Shape, place
from novasandbox.errors import NoCapacity

PY = {"python": Shape(1, 256)}


def node(name: str, slots: int = 4, vcpus: int = 8, memory: int = 2048, **kw: object) -> NodeLoad:
    return NodeLoad(name, Capacity(slots, vcpus, memory), templates=dict(PY), **kw)  # type: ignore[arg-type]


def test_the_best_of_k_by_free_memory_wins() -> None:
    a, b, c = node("a", memory=1024), node("b", memory=4096), node("c", memory=2048)
    # with k = the number of nodes every node is a candidate: the freest wins
    r = place([a, b, c], "python", k=3, rng=random.Random(1))
    assert r.node_id == "b" and r.shape == Shape(1, 256)
    assert (b.sandboxes, b.vcpus, b.memory_mib) == (1, 1, 256)
    assert a.sandboxes == c.sandboxes == 0


def test_k_random_candidates_spread_the_load() -> None:
    nodes = [node(str(i), slots=100, vcpus=1000, memory=100_000) for i in range(4)]
    rng = random.Random(7)
    for _ in range(200):
        place(nodes, "python", k=2, rng=rng)
    counts = [n.sandboxes for n in nodes]
    assert sum(counts) == 200
    assert max(counts) - min(counts) <= 2  # two choices keep them within one or two


def test_no_placement_beyond_any_limit() -> None:
    nodes = [
        node("a", slots=3, vcpus=100, memory=100_000),
        node("b", slots=100, vcpus=2, memory=100_000),
    ]
    placed = 0
    with pytest.raises(NoCapacity) as err:
        while True:
            place(nodes, "python", k=2, rng=random.Random(placed))
            placed += 1
    assert placed == 5  # 3 slots on a, 2 vCPUs on b
    assert "all 3 slots taken" in err.value.message and "0 vCPUs free" in err.value.message
    assert err.value.code == "no-capacity"
    mem = node("m", slots=10, memory=600)
    place([mem], "python")
    place([mem], "python")
    with pytest.raises(NoCapacity, match="88 MiB free, 256 MiB asked"):
        place([mem], "python")


def test_only_ready_nodes_with_the_template_built_are_eligible() -> None:
    draining = node("d", state=NodeState.DRAINING)
    lost = node("l", state=NodeState.LOST)
    starting = node("s", state=NodeState.STARTING)
    other = NodeLoad("o", Capacity(4, 8, 2048), templates={"other": Shape(1, 128)})
    with pytest.raises(NoCapacity) as err:
        place([draining, lost, starting, other], "python")
    message = err.value.message
    assert "d: draining" in message and "l: lost" in message and "s: starting" in message
    assert "o: template 'python' not built there" in message
    assert place([draining, other, node("r")], "python").node_id == "r"
    with pytest.raises(NoCapacity, match="no cluster node is ready"):
        place([], "python")


def test_a_shape_asked_for_and_release() -> None:
    a = node("a", vcpus=4, memory=1024)
    r = place([a], "python", Shape(2, 512))
    assert r.shape == Shape(2, 512) and (a.vcpus, a.memory_mib) == (2, 512)
    a.release(r.shape)
    assert (a.sandboxes, a.vcpus, a.memory_mib) == (0, 0, 0)
    a.release(r.shape)  # never below zero
    assert (a.sandboxes, a.vcpus, a.memory_mib) == (0, 0, 0)


def test_ties_are_broken_at_random_not_by_id() -> None:
    # equal free memory and load: every node must get sandboxes, the lowest id too
    rng = random.Random(3)
    chosen = set()
    for _ in range(60):
        nodes = [node(n) for n in ("a", "b", "c")]
        chosen.add(place(nodes, "python", k=2, rng=rng).node_id)
    assert chosen == {"a", "b", "c"}


def test_a_relayed_path_is_rebuilt_from_checked_segments() -> None:
    from starlette.exceptions import HTTPException

    from novasandbox.cluster.app import upstream_path

    assert upstream_path("sb-0123abcd45", "commands/42/close-stdin") == (
        "/v1/sandboxes/sb-0123abcd45/commands/42/close-stdin"
    )
    # anything a URL parser (ours, httpx's, the node's) could resolve to another sandbox
    for sandbox_id, rest in [
        ("sb-mine", "../sb-other/files"),
        ("sb-mine", "files/../../sb-other/files"),
        ("sb-mine", "./files"),
        ("sb-mine", "files//list"),
        ("..", "sb-other/files"),
        ("sb-mine", "files/%2e%2e"),
        ("sb-mine", "files?x=1"),
        ("sb-mine", ""),
    ]:
        with pytest.raises(HTTPException) as err:
            upstream_path(sandbox_id, rest)
        assert err.value.status_code == 404


def test_a_sandboxs_share_is_released_once_whatever_its_node_says() -> None:
    from novasandbox.cluster.registry import ClusterRegistry, Node, Routed

    registry = ClusterRegistry()
    load = node("n1")
    registry.nodes["n1"] = Node("n1", actor=None, load=load)
    shapes = [Shape(1, 256), Shape(2, 512)]
    for i, shape in enumerate(shapes):
        load.hold(shape)
        info = {"id": f"sb-{i}", "state": "running", "labels": {}}
        registry.routes[f"sb-{i}"] = Routed(f"sb-{i}", "n1", "key_a", info, shape)
    assert (load.sandboxes, load.vcpus, load.memory_mib) == (2, 3, 768)
    routed = registry.routes["sb-1"]
    # its lifetime ended: seen through a get, then through a refresh, then again
    ended = {
        "id": "sb-1",
        "state": "killed",
        "expired": True,
        "labels": {"novasandbox.owner": "key_a"},
    }
    for _ in range(3):
        registry.observe(routed, ended)
    assert (load.sandboxes, load.vcpus, load.memory_mib) == (1, 1, 256)
    assert routed.state == "killed" and routed.ended_at > 0
    assert "novasandbox.owner" not in routed.info["labels"]  # never shown to clients
    # a lost node's sandboxes hold nothing (its load was cleared when it was lost)
    registry._lose(registry.nodes["n1"], "test")
    assert (load.sandboxes, load.vcpus, load.memory_mib) == (0, 0, 0)
    registry.observe(registry.routes["sb-0"], {"id": "sb-0", "state": "killed", "labels": {}})
    assert (load.sandboxes, load.vcpus, load.memory_mib) == (0, 0, 0)
    assert registry.routes["sb-0"].state == "lost"


def test_an_unrouted_sandbox_is_an_orphan_only_once_its_create_is_over() -> None:
    from novasandbox.cluster.registry import ClusterRegistry, Node

    registry = ClusterRegistry()
    n1 = Node("n1", actor=None, load=node("n1"))
    owned = {"id": "sb-x", "state": "running", "labels": {"novasandbox.owner": "key_a"}}
    # a create on its way since before the first list that showed the sandbox: not yet
    with registry._on_its_way(n1):
        (started,) = n1.making.values()
        assert not registry._orphan(n1, owned, listed_at=started + 1)
        assert not registry._orphan(n1, owned, listed_at=started + 2)
    assert n1.making == {}
    n1.unrouted.clear()
    n1.making[1] = 9.0
    assert not registry._orphan(n1, owned, listed_at=10.0)
    assert not registry._orphan(n1, owned, listed_at=12.0)
    del n1.making[1]
    # over (its reply lost), and listed unrouted again: an orphan
    assert registry._orphan(n1, owned, listed_at=14.0)
    # a create that began after the first listing cannot have made it
    n1.unrouted.clear()
    assert not registry._orphan(n1, owned, listed_at=20.0)
    n1.making[99] = 21.0
    assert registry._orphan(n1, owned, listed_at=22.0)
    # no owner (not the cluster's) or already ended: never
    ended = {**owned, "id": "sb-y", "state": "killed"}
    foreign = {"id": "sb-z", "state": "running", "labels": {}}
    for d in (ended, foreign):
        assert not registry._orphan(n1, d, listed_at=30.0)
        assert not registry._orphan(n1, d, listed_at=32.0)


def test_a_fork_or_restore_is_held_on_its_own_node_or_refused() -> None:
    from novasandbox.cluster.registry import ClusterRegistry, Node
    from novasandbox.errors import SandboxLost

    registry = ClusterRegistry()
    load = node("n1", slots=2)
    n1 = Node("n1", actor=None, load=load)
    registry._hold_on(n1, Shape(1, 256), "sandbox a")
    registry._hold_on(n1, Shape(1, 256), "sandbox a")
    with pytest.raises(NoCapacity, match="sandbox a is on node n1, which cannot take it: all 2"):
        registry._hold_on(n1, Shape(1, 256), "sandbox a")
    assert load.sandboxes == 2
    load.state = NodeState.DRAINING
    load.sandboxes = 0
    with pytest.raises(NoCapacity, match="draining"):
        registry._hold_on(n1, Shape(1, 256), "snapshot s")
    load.state = NodeState.READY  # (a draining, empty node that goes is removed, not lost)
    registry._lose(n1, "test")
    with pytest.raises(SandboxLost):
        registry._hold_on(n1, Shape(1, 256), "snapshot s")


def test_a_drained_empty_node_that_goes_is_removed_not_lost() -> None:
    from novasandbox.cluster.registry import ClusterRegistry, Node, Routed

    registry = ClusterRegistry()
    for name in ("empty", "busy"):
        registry.nodes[name] = Node(name, actor=None, load=node(name, state=NodeState.DRAINING))
    info = {"id": "sb-1", "state": "running", "labels": {}}
    registry.routes["sb-1"] = Routed("sb-1", "busy", "key_a", info, Shape(1, 256))
    registry._lose(registry.nodes["empty"], "Ray reports its node dead")
    registry._lose(registry.nodes["busy"], "Ray reports its node dead")
    assert "empty" not in registry.nodes
    assert registry.nodes["busy"].state is NodeState.LOST
    assert registry.routes["sb-1"].state == "lost"
