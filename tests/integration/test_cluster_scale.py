"""A thousand sandboxes over four Ray nodes, simulated (``tests/cluster_scale.py``: the
in-process provider on every node, no VM; the real cluster server and HTTP API): more
creates than the nodes have slots, so placement runs into every node's limit.

Checked: every node holds exactly its slots and never more, the creates beyond them are
refused with ``no-capacity``, every sandbox answers a command, none is lost or listed
twice, and all of them and the cluster are gone at the end. The figures (creates and
placement decisions per second, the server's memory per sandbox) are printed; the
benchmark (``benchmarks/bench_cluster.py``) records them."""

from __future__ import annotations

import json

import pytest

from tests.cluster_scale import run_scale
from tests.ray_cluster import can_run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(can_run() is not None, reason=str(can_run())),
]

SLOTS = [200, 250, 300, 300]
EXTRA = 10


@pytest.mark.timeout(1800)  # 1,060 creates, commands and kills: minutes on a loaded machine
def test_a_thousand_sandboxes_over_four_nodes_within_their_limits() -> None:
    total = sum(SLOTS)
    result = run_scale(total + EXTRA, SLOTS, parallel=16)
    figures = result.figures()
    print("\n" + json.dumps({k: v for k, v in figures.items() if k != "first_errors"}))
    assert len(result.created) == total >= 1000
    assert len(result.errors) == EXTRA
    assert all('"no-capacity"' in e for e in result.errors), result.errors[:3]
    assert sorted(result.per_node.values()) == sorted(SLOTS)
    assert all(result.per_node[n] == s for n, s in result.slots_by_node.items())
    assert result.listed == result.listed_unique == total
    assert sorted(result.created) == sorted(set(result.created))
    assert result.lost == 0
    assert result.ran == total
    assert figures["placement_decisions"] == total  # one per create that found a node
