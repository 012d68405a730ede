"""``get_metrics``'s host side without a VM: the agent's reply is checked by the schema
(types) and by ``guest_metrics`` (ranges); the remote client refuses a reply of another
shape; the VMM's RSS comes from /proc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import novasandbox
from novasandbox.errors import AgentProtocolError, RemoteError
from novasandbox.guest.protocol import ProtocolError, check_reply
from novasandbox.procfs import process_rss
from novasandbox.remote import metrics_from_json
from novasandbox.results import SandboxMetrics
from novasandbox.sandbox import guest_metrics

GOOD: dict[str, Any] = {
    "op": "ok",
    "cpu_used_pct": 12.5,
    "cpu_count": 2,
    "mem_used": 100 << 20,
    "mem_total": 480 << 20,
    "disk_used": 300 << 20,
    "disk_total": 1 << 30,
}


def test_a_good_reply_becomes_sandbox_metrics() -> None:
    m = guest_metrics(check_reply("metrics", dict(GOOD)), 123 << 20)
    assert m == SandboxMetrics(12.5, 2, 100 << 20, 480 << 20, 300 << 20, 1 << 30, 123 << 20)
    assert m.to_json() == {**{k: v for k, v in GOOD.items() if k != "op"}, "vmm_rss": 123 << 20}
    assert novasandbox.SandboxMetrics is SandboxMetrics
    # an integer percentage is a number too (JSON does not tell 50 from 50.0)
    assert guest_metrics({**GOOD, "cpu_used_pct": 50}, None).cpu_used_pct == 50.0


@pytest.mark.parametrize(
    "change",
    [
        {"cpu_used_pct": "12"},
        {"cpu_used_pct": None},
        {"cpu_count": 2.0},
        {"cpu_count": True},
        {"mem_used": "1"},
        {"disk_total": [1]},
        {"mem_total": None},
    ],
)
def test_the_schema_refuses_other_types(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        check_reply("metrics", {**GOOD, **change})


def test_the_schema_refuses_a_missing_field() -> None:
    reply = dict(GOOD)
    del reply["disk_used"]
    with pytest.raises(ProtocolError, match="disk_used"):
        check_reply("metrics", reply)


@pytest.mark.parametrize(
    "change",
    [
        {"cpu_used_pct": -0.1},
        {"cpu_used_pct": 100.5},
        {"cpu_used_pct": float("nan")},
        {"cpu_used_pct": float("inf")},
        {"cpu_count": 0},
        {"cpu_count": -3},
        {"cpu_count": 1 << 40},
        {"mem_used": -1},
        {"disk_total": 1 << 64, "disk_used": 1},
        {"mem_used": (480 << 20) + 1},  # more used than there is
        {"disk_used": (1 << 30) + 1},
    ],
)
def test_values_out_of_range_are_an_agent_protocol_error(change: dict[str, Any]) -> None:
    reply = check_reply("metrics", {**GOOD, **change})  # the types are right
    with pytest.raises(AgentProtocolError, match="out of range") as info:
        guest_metrics(reply, None)
    assert info.value.code == "agent-protocol-error"


def test_the_edges_of_the_ranges_are_taken() -> None:
    assert guest_metrics({**GOOD, "cpu_used_pct": 0.0}, None).cpu_used_pct == 0.0
    assert guest_metrics({**GOOD, "cpu_used_pct": 100.0}, None).cpu_used_pct == 100.0
    full = guest_metrics({**GOOD, "mem_used": 480 << 20, "disk_used": 1 << 30}, None)
    assert (full.mem_used, full.disk_used) == (full.mem_total, full.disk_total)


def test_the_remote_client_reads_the_servers_json_or_refuses_it() -> None:
    body = {k: v for k, v in GOOD.items() if k != "op"}
    assert metrics_from_json({**body, "vmm_rss": None}).vmm_rss is None
    assert metrics_from_json({**body, "vmm_rss": 5}) == SandboxMetrics(
        12.5, 2, 100 << 20, 480 << 20, 300 << 20, 1 << 30, 5
    )
    for bad in (body, {**body, "vmm_rss": 1, "cpu_count": "x"}, [], None):
        with pytest.raises(RemoteError, match="metrics in an unknown shape"):
            metrics_from_json(bad)


def test_process_rss_is_vmrss_in_bytes() -> None:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    rss = process_rss(os.getpid())
    assert rss is not None
    assert abs(rss - kb * 1024) < 64 << 20  # this process's, read moments apart
    assert process_rss(2**22 + 1) is None  # above pid_max's default: no such process
