"""What the egress policy refuses is heard, on real VMs: logged on the host, counted in
the sandbox's record, listed by ``network_log()`` (async and sync) and by the CLI from
another process; a guest that floods refused destinations leaves its owner's memory,
log and files bounded while the count stays exact. Both enforcements: nftables (root,
the kernel's NFLOG messages and counters) and the seccomp guard (VMMs that keep the
owner's uid, as without root). Also: "no network" (``network="none"``) looks different
from "refused by policy", and says so.

Everything stays on this machine: servers on the host's loopback (the guest's 10.0.2.2)
and documentation addresses (203.0.113.0/24) that no policy here lets through."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import AsyncSandbox, NetworkLog, Sandbox
from novasandbox.host import egress, nflog, tap

from .conftest import assert_no_leftovers
from .helpers import Namespaces

CLI = [sys.executable, "-m", "novasandbox.cli"]

# connect (TCP) or send (UDP) to each HOST:PORT[/udp] argument; print what happened
REACH = """
import socket, sys
for target in sys.argv[1:]:
    where, _, proto = target.partition("/")
    host, _, port = where.rpartition(":")
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", (host, int(port)))
        print(target, "sent")
        continue
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        print(target, "connected")
    except OSError as exc:
        print(target, type(exc).__name__, exc.errno, exc.strerror)
    s.close()
"""


RESOLVE = ["python3", "-c", "import socket; socket.getaddrinfo('example.com', 443)"]


def reach(sb: Sandbox, *targets: str) -> list[str]:
    r = sb.commands.run(["python3", "-c", REACH, *targets], timeout=120)
    assert r.exit_code == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture(params=["nftables", "guard"])
def enforcement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who enforces the policy: nftables on the VMM's own uid (root), or the seccomp
    guard (``NOVASANDBOX_DROP_PRIVILEGES=0``: the VMM keeps our uid, as without root)."""
    if request.param == "nftables" and os.geteuid() != 0:
        pytest.skip("nftables policies need root")
    if request.param == "guard":
        monkeypatch.setenv("NOVASANDBOX_DROP_PRIVILEGES", "0")
    return str(request.param)


@pytest.fixture
def listening() -> Iterator[int]:
    """A TCP server on the host's loopback (the guest's 10.0.2.2) that the allow list
    names."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def record_of(sandbox_id: str) -> Any:
    return next(i for i in Sandbox.list() if i.id == sandbox_id)


def wait_recorded(sandbox_id: str, count: int) -> int:
    """The refused count of the sandbox's record once it reaches ``count`` (the owner
    writes it a moment after the refusals), or what it holds after 20 s."""
    deadline = time.monotonic() + 20
    while (n := record_of(sandbox_id).refused) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(n)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, env=env or os.environ.copy()
    )


def test_refusals_are_logged_counted_and_listed(
    factory: Any, enforcement: str, listening: int, caplog: pytest.LogCaptureFixture
) -> None:
    sb = factory.create(network="nat", allow=[f"127.0.0.1:{listening}"])
    assert (egress.chain_name(sb.id) in egress.installed()) is (enforcement == "nftables")
    with caplog.at_level(logging.WARNING, logger="novasandbox"):
        out = reach(
            sb,
            f"10.0.2.2:{listening}",  # allowed
            f"10.0.2.2:{listening + 1 if listening < 65535 else 1}",
            "203.0.113.80:443",
            "203.0.113.9:5353/udp",
        )
        assert out[0].endswith("connected")
        assert out[1].endswith("ConnectionRefusedError 111 Connection refused")
        assert out[2].endswith("ConnectionRefusedError 111 Connection refused")
        log = sb.network_log()
    other = listening + 1 if listening < 65535 else 1
    # the guest's 10.0.2.2 is the host's loopback: the policy (and its log) name that
    expected = [
        ("tcp", "127.0.0.1", other, "not in the allow list"),
        ("tcp", "203.0.113.80", 443, "not in the allow list"),
        ("udp", "203.0.113.9", 5353, "not in the allow list"),
    ]
    got = [(e.protocol, e.address, e.port, e.rule) for e in log.entries]
    assert got == expected
    assert log.refused == 3
    assert all(time.time() - 120 < e.time <= time.time() for e in log.entries)
    # a WARNING on the host for each, naming the sandbox, destination and rule
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"sandbox {sb.id}: refused tcp 203.0.113.80:443 (rule: not in the allow list)" in lines
    assert f"sandbox {sb.id}: refused udp 203.0.113.9:5353 (rule: not in the allow list)" in lines
    # the count in the sandbox's record, as other processes see it
    assert wait_recorded(sb.id, 3) == 3
    # and the CLI, from another process
    r = cli("network-log", sb.id, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["id"] == sb.id and data["refused"] == 3
    listed = [(e["protocol"], e["address"], e["port"], e["rule"]) for e in data["entries"]]
    assert listed == expected
    r = cli("network-log", sb.id)
    assert r.returncode == 0, r.stderr
    assert "refused tcp 203.0.113.80:443 (not in the allow list)" in r.stdout
    assert r.stdout.splitlines()[-1] == f"{sb.id}: 3 refused"


def test_each_rule_is_named(factory: Any, enforcement: str) -> None:
    """The public-internet default names the non-public range; an empty allow list
    says there is no egress at all (without root too: the guard refuses at once, where
    QEMU's restricted stack used to let connections time out unheard)."""
    public = factory.create(network="nat")
    closed = factory.create(network="nat", allow=[])
    for sb, rule in (
        (public, "non-public range 203.0.113.0/24"),
        (closed, "no egress at all (allow=[])"),
    ):
        out = reach(sb, "203.0.113.80:443")
        assert out[0].endswith("ConnectionRefusedError 111 Connection refused")
        log = sb.network_log()
        assert [(e.protocol, e.address, e.port, e.rule) for e in log.entries] == [
            ("tcp", "203.0.113.80", 443, rule)
        ]
    r = closed.commands.run(RESOLVE, timeout=60)
    assert r.exit_code != 0  # no resolver with allow=[]: lookups fail at once, unlogged
    assert "Temporary failure in name resolution" in r.stderr
    assert closed.network_log().refused == 1


def test_async_sandbox_network_log(enforcement: str, state_root: Path) -> None:
    async def scenario() -> NetworkLog:
        sb = await AsyncSandbox.create(network="nat", allow=["127.0.0.1:1"])
        try:
            r = await sb.commands.run(["python3", "-c", REACH, "203.0.113.80:8443"], timeout=120)
            assert "ConnectionRefusedError" in r.stdout
            return await sb.network_log()
        finally:
            await sb.kill()

    log = asyncio.run(scenario())
    assert log.refused == 1
    assert [(e.protocol, e.address, e.port) for e in log.entries] == [("tcp", "203.0.113.80", 8443)]
    assert_no_leftovers(state_root)


def test_no_network_looks_different_from_a_refusal(factory: Any) -> None:
    """network="none": no NIC, so no route ("Network is unreachable") and no resolver
    ("Temporary failure in name resolution"), and nothing for the policy to refuse."""
    sb = factory.create()
    out = reach(sb, "203.0.113.80:443")
    assert out[0].endswith("OSError 101 Network is unreachable")
    r = sb.commands.run(RESOLVE, timeout=60)
    assert r.exit_code != 0
    assert "Temporary failure in name resolution" in r.stderr
    assert sb.network_log() == NetworkLog(0, ())
    assert record_of(sb.id).refused == 0
    r = cli("network-log", sb.id)
    assert r.returncode == 0 and r.stdout.strip() == f"{sb.id}: 0 refused"


def test_network_log_of_an_unknown_sandbox_is_an_error(state_root: Path) -> None:
    r = cli("network-log", "sb-0000000000")
    assert r.returncode == 125
    assert "sandbox-not-found" in r.stderr


CONNECT = "import socket; socket.create_connection(('203.0.113.80', 443), timeout=10)"


def test_cli_run_shows_the_refusal_and_a_summary(enforcement: str, state_root: Path) -> None:
    r = cli(
        "-v", "run", "--network", "nat", "--allow", "127.0.0.1:1", "--", "python3", "-c", CONNECT
    )
    assert r.returncode == 1  # the guest's python raised ConnectionRefusedError
    assert "ConnectionRefusedError" in r.stderr
    assert "WARNING" in r.stderr
    assert "refused tcp 203.0.113.80:443 (rule: not in the allow list)" in r.stderr
    assert (
        "novasandbox: the network policy refused 1 connection: tcp 203.0.113.80:443 "
        "(not in the allow list); see --allow"
    ) in r.stderr.splitlines()
    quiet = cli("run", "--network", "nat", "--", "python3", "-c", "print('fine')")
    assert quiet.returncode == 0 and "refused" not in quiet.stderr
    assert_no_leftovers(state_root)


FLOOD = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for i in range(int(sys.argv[1])):
    try:
        u.sendto(b"x", ("203.0.113.9", 9000 + i % 10))
        sent += 1
    except OSError:
        pass
print(sent)
"""


def vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_refusals_stays_bounded_and_counted(
    factory: Any, enforcement: str, caplog: pytest.LogCaptureFixture
) -> None:
    sb = factory.create(network="nat", allow=["127.0.0.1:1"])
    reach(sb, "203.0.113.9:1/udp")  # warm the guest's path up
    before = vm_rss_kib()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="novasandbox"):
        r = sb.commands.run(["python3", "-c", FLOOD, "5000"], timeout=300)
        assert r.stdout.strip() == "5000", r.stderr
        time.sleep(1)  # the last counts reach the owner
        log = sb.network_log()
    elapsed = time.monotonic() - t0
    grown = vm_rss_kib() - before
    if enforcement == "guard":
        # the guard answers every call the VMM makes: each datagram is one refusal
        assert log.refused == 5001
    else:
        # the kernel counts what the VMM sent (QEMU's user-mode stack drops some of a
        # burst before sending it): the count is the kernel's own counter
        assert log.refused == egress.refused_count(sb.id)
        assert 1000 < log.refused <= 5001
    assert wait_recorded(sb.id, log.refused) == log.refused
    lines = [
        r.getMessage() for r in caplog.records if f"sandbox {sb.id}: refused" in r.getMessage()
    ]
    bound = nflog.BURST + nflog.RATE_PER_SECOND * (elapsed + 1)
    assert len(lines) <= bound < log.refused  # logged in part, counted in full
    assert len(log.entries) <= NetworkLog.MAX_ENTRIES
    assert len(log.entries) == len(lines)
    assert log.not_listed == log.refused - len(log.entries)
    assert any("were not logged (rate limit)" in r.getMessage() for r in caplog.records)
    written = Path(sb.paths.network_log).read_text().splitlines()
    assert len(written) <= 2 * NetworkLog.MAX_ENTRIES
    assert grown < 64 * 1024, f"the owner grew by {grown} KiB"
    # the sandbox still works, and still refuses
    assert reach(sb, "203.0.113.80:443")[0].endswith("Connection refused")


# ----------------------------------------------------------------------------- tap


def test_tap_refusals_are_heard_in_the_taps_namespace(factory: Any, namespaces: Namespaces) -> None:
    sb = factory.create(network="tap", allow=["10.250.0.2:9001"])
    out = reach(sb, "10.250.0.2:9001", "10.250.0.2:9002", "10.250.0.2:53/udp")
    assert out[0].endswith("connected")
    assert out[1].endswith("ConnectionRefusedError 111 Connection refused")
    log = sb.network_log()
    assert [(e.protocol, e.address, e.port, e.rule) for e in log.entries] == [
        ("tcp", "10.250.0.2", 9002, "not in the allow list"),
        ("udp", "10.250.0.2", 53, "not in the allow list"),
    ]
    assert log.refused == 2
    assert log.refused == egress.refused_count(sb.id, tap.table())
    assert wait_recorded(sb.id, 2) == 2
    # this process's NFLOG socket in that namespace goes with its last sandbox (it would
    # keep a deleted namespace alive)
    assert namespaces.inner in nflog._LISTENERS
    sb.kill()
    assert namespaces.inner not in nflog._LISTENERS
