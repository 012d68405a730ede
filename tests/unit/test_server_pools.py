"""The server's warm pools without a VM: ``--pool`` specs, and which creates a pool may
serve (the in-process provider: nothing is started until ``start``)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox.errors import ConfigError, TemplateNotFound
from novasandbox.server.pools import WarmPools, parse_pool_specs
from novasandbox.templates import TemplateManager
from tests.server_support import Server, iter_wait, make_key

INPROCESS = {"NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}


@pytest.fixture(autouse=True)
def _inprocess(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("NOVASANDBOX_ALLOW_INPROCESS", "1")
    yield


def test_pool_specs() -> None:
    assert parse_pool_specs(["python=2", "other.t=64"]) == {"python": 2, "other.t": 64}
    assert parse_pool_specs([]) == {}
    for bad, words in [
        ("python", "TEMPLATE=N"),
        ("python=", "TEMPLATE=N"),
        ("=2", "TEMPLATE=N"),
        ("python=-1", "TEMPLATE=N"),
        ("python=0", "from 1 to 64"),
        ("python=65", "from 1 to 64"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_pool_specs([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_pool_specs(["python=1", "python=2"])


def test_an_unknown_template_fails_at_once() -> None:
    with pytest.raises(TemplateNotFound):
        WarmPools({"nosuch": 1}, provider="inprocess")


@pytest.mark.parametrize(
    ("arguments", "hit"),
    [
        ({"template": "python", "timeout": 300.0}, True),
        ({"template": "python", "vcpus": None, "memory_mib": None, "env": {}}, True),
        ({"template": "python", "vcpus": "DEFAULT_VCPUS", "memory_mib": "DEFAULT_MEM"}, True),
        ({"template": "python", "timeout": None, "network": "none", "ports": []}, True),
        ({"template": "python", "vcpus": 2}, False),
        ({"template": "python", "memory_mib": 512}, False),
        ({"template": "python", "env": {"A": "1"}}, False),
        ({"template": "python", "network": "nat"}, False),
        ({"template": "python", "allow": []}, False),
        ({"template": "python", "ports": [80]}, False),
        ({"template": "python", "cold": True}, False),
        ({"template": "other"}, False),
    ],
)
def test_which_creates_a_pool_serves(arguments: dict[str, Any], hit: bool) -> None:
    tpl = TemplateManager().get("python")
    if arguments.get("vcpus") == "DEFAULT_VCPUS":
        arguments = {**arguments, "vcpus": tpl.vcpus, "memory_mib": tpl.memory_mib}
    pools = WarmPools({"python": 1}, provider="inprocess")
    assert pools.poolable(arguments) is hit
    assert pools.ready() == {"python": 0}  # nothing made before start
    assert not WarmPools({}).poolable(arguments)


def _pool_gauge(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith('novasandbox_pool_size{template="python"}'):
            return float(line.split()[-1])
    return None


def test_a_served_pool_hands_over_refills_and_is_killed_at_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "alice")
    env = {**os.environ, **INPROCESS}
    env.pop("NOVASANDBOX_STATE_DIR", None)
    with Server(state, "--pool", "python=1", env=env) as server, server.client(key) as c:
        for _ in iter_wait("the pool to fill"):
            if _pool_gauge(c.get("/metrics").text) == 1.0:
                break
        plain = c.post("/v1/sandboxes", json={"env": {"A": "1"}}).json()
        assert plain["pooled"] is False
        got = c.post("/v1/sandboxes", json={"labels": {"k": "v"}, "timeout": 100}).json()
        assert got["pooled"] is True and got["labels"] == {"k": "v"}
        assert got["expires_at"] - got["created_at"] < 105
        assert _pool_gauge(c.get("/metrics").text) == 0.0
        assert c.get(f"/v1/sandboxes/{got['id']}").json()["pooled"] is True
        for _ in iter_wait("the pool to refill"):
            if _pool_gauge(c.get("/metrics").text) == 1.0:
                break
        assert c.delete(f"/v1/sandboxes/{got['id']}", params={"wait": "false"}).status_code == 202
        assert c.get(f"/v1/sandboxes/{got['id']}").status_code == 404
        assert server.stop() == 0
    stopped = [e for e in server.events() if e.get("message") == "killed the server's sandboxes"]
    assert stopped and stopped[0]["count"] == 1  # the plain one; the pooled one went first
    base = state / "sandboxes"
    assert not base.is_dir() or list(base.iterdir()) == []


def _records(state: Path) -> dict[str, dict[str, Any]]:
    base = state / "server" / "sandboxes"
    if not base.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in base.glob("*.json")}


def test_idle_pooled_sandboxes_are_recorded_and_reaped_after_a_crash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "alice")
    env = {**os.environ, **INPROCESS}
    env.pop("NOVASANDBOX_STATE_DIR", None)
    with Server(state, "--pool", "python=1", env=env) as first, first.client(key) as c:
        for _ in iter_wait("the pool to fill"):
            if _pool_gauge(c.get("/metrics").text) == 1.0:
                break
        [(idle, record)] = _records(state).items()
        assert record["pooled"] is True and record["owner"] == "" and record["labels"] == {}
        got = c.post("/v1/sandboxes", json={"labels": {"k": "v"}}).json()
        assert got["pooled"] is True and got["id"] == idle
        mine = _records(state)[idle]  # the hand-over made it the key's
        assert mine["pooled"] is False and mine["owner"] and mine["labels"] == {"k": "v"}
        for _ in iter_wait("the pool to refill"):
            if _pool_gauge(c.get("/metrics").text) == 1.0:
                break
        [refilled] = [i for i, r in _records(state).items() if r["pooled"]]
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (state / "sandboxes" / refilled).is_dir()  # what the crash left
    with Server(state, "--pool", "python=1", env=env) as second, second.client(key) as c:
        said = [
            e
            for e in second.events()
            if e.get("message") == "pooled sandbox of the last run reaped"
        ]
        assert [e["sandbox"] for e in said] == [refilled]
        assert not (state / "sandboxes" / refilled).exists()
        for _ in iter_wait("the pool to fill again"):
            if _pool_gauge(c.get("/metrics").text) == 1.0:
                break
        records = _records(state)
        assert refilled not in records
        assert [r["pooled"] for r in records.values()] == [True]  # the new one only
        assert second.stop() == 0
    assert _records(state) == {}  # the stop killed the idle one and forgot it
    base = state / "sandboxes"
    assert not base.is_dir() or list(base.iterdir()) == []
