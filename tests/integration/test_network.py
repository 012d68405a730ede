"""Networking on real VMs: no device by default; user-mode NAT whose egress the host
kernel filters on the VMM's uid; guest ports exposed on the host's loopback.

Everything stays on this machine: HTTP servers on the host's loopback (which the guest
reaches as 10.0.2.2), and the host's own resolver for DNS."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import ConfigError, NetworkError, NetworkMode, Sandbox
from novasandbox import sandbox as sandbox_module
from novasandbox.gc import vmm_pids_under
from novasandbox.host import egress, tap
from novasandbox.network import GATEWAY, guest_mac
from novasandbox.records import new_sandbox_id
from novasandbox.snapshots import delete_snapshot

from .conftest import assert_no_leftovers
from .helpers import HostServer, Namespaces

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="egress policies are nftables rules on the VMM's uid (root)"
)


@pytest.fixture
def servers() -> Iterator[tuple[HostServer, HostServer]]:
    allowed, other = HostServer.answering(b"allowed"), HostServer.answering(b"other")
    yield allowed, other
    allowed.close()
    other.close()


FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
    "except Exception as exc:\n"
    "    print('failed:', type(exc).__name__, exc)\n"
    "    sys.exit(3)\n"
)


def fetch(sb: Sandbox, url: str) -> tuple[int | None, str]:
    r = sb.commands.run(["python3", "-c", FETCH, url], timeout=60)
    return r.exit_code, r.stdout.strip()


@pytest.mark.parametrize("cold", [False, True], ids=["restored", "cold"])
def test_default_network_is_none_loopback_only(factory: Any, cold: bool) -> None:
    sb = factory.create(cold=cold)
    assert sb.commands.run("ls /sys/class/net").stdout.split() == ["lo"]


@root_only
@pytest.mark.parametrize("cold", [False, True], ids=["restored", "cold"])
def test_nat_allows_what_is_listed_and_refuses_the_rest(
    factory: Any, servers: tuple[HostServer, HostServer], cold: bool
) -> None:
    allowed, other = servers
    # the enum and its string are the same mode
    network = NetworkMode.NAT if cold else "nat"
    sb = factory.create(cold=cold, network=network, allow=[f"127.0.0.1:{allowed.port}"])
    assert sb.restored is (not cold)
    assert sb.config.network.mode is NetworkMode.NAT
    assert sb.commands.run("ls /sys/class/net").stdout.split() == ["eth0", "lo"]
    assert fetch(sb, f"http://{GATEWAY}:{allowed.port}/") == (0, "allowed")
    code, out = fetch(sb, f"http://{GATEWAY}:{other.port}/")
    assert code == 3 and "failed" in out
    assert other.hits == 0  # the connection never reached the server
    assert allowed.hits == 1
    # the guest carries its own MAC (a restored one replaces the snapshot's)
    mac = sb.commands.run("cat /sys/class/net/eth0/address").stdout.strip()
    assert mac == guest_mac(sb.id)


@root_only
def test_public_default_denies_private_ranges_but_dns_works(
    factory: Any, servers: tuple[HostServer, HostServer]
) -> None:
    allowed, _ = servers
    sb = factory.create(network="nat")  # allow=None: the public internet only
    code, out = fetch(sb, f"http://{GATEWAY}:{allowed.port}/")
    assert code == 3 and "failed" in out
    assert allowed.hits == 0
    # DNS goes through the VMM's forwarder to the host's resolver (always allowed)
    name = "localhost"
    for candidate in ("deb.debian.org", "pypi.org"):
        try:
            socket.gethostbyname(candidate)
            name = candidate
            break
        except OSError:
            continue
    if name == "localhost":
        pytest.skip("the host resolves no public name")
    expected = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    r = sb.commands.run(["getent", "ahostsv4", name], timeout=30)
    assert r.exit_code == 0, r.stderr
    assert {line.split()[0] for line in r.stdout.splitlines()} & expected


@root_only
def test_empty_allow_list_has_no_egress_and_no_dns_but_ports_work(
    factory: Any, servers: tuple[HostServer, HostServer]
) -> None:
    allowed, _ = servers
    sb = factory.create(network="nat", allow=[], ports=[8000])
    assert egress.chain_name(sb.id) in egress.installed()
    code, _ = fetch(sb, f"http://{GATEWAY}:{allowed.port}/")
    assert code == 3
    assert allowed.hits == 0
    r = sb.commands.run(["getent", "hosts", "deb.debian.org"], timeout=30)
    assert r.exit_code != 0  # no resolver, and a lookup fails at once
    sb.files.write("/srv/index.html", "served by the guest", user="root")
    sb.commands.start(["python3", "-m", "http.server", "8000", "--directory", "/srv"])
    host = sb.get_host(8000)
    assert host.startswith("127.0.0.1:")
    deadline = time.monotonic() + 30
    while True:
        try:
            body = urllib.request.urlopen(f"http://{host}/index.html", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert body == b"served by the guest"
    with pytest.raises(ConfigError, match="not exposed"):
        sb.get_host(9000)


@root_only
def test_forks_get_their_own_mac_and_working_network(
    factory: Any, servers: tuple[HostServer, HostServer]
) -> None:
    allowed, _ = servers
    parent = factory.create(network="nat", allow=[f"127.0.0.1:{allowed.port}"])
    children = [factory.track(c) for c in parent.fork(2)]
    macs = set()
    for child in children:
        mac = child.commands.run("cat /sys/class/net/eth0/address").stdout.strip()
        assert mac == guest_mac(child.id)
        macs.add(mac)
        assert fetch(child, f"http://{GATEWAY}:{allowed.port}/") == (0, "allowed")
    assert len(macs | {guest_mac(parent.id)}) == 3
    # a snapshot of a networked sandbox restores only into a networked one
    snap = parent.snapshot()
    try:
        with pytest.raises(ConfigError, match="network"):
            Sandbox.create(from_snapshot=snap)
    finally:
        delete_snapshot(snap)


@root_only
def test_policy_is_removed_with_the_sandbox(factory: Any, state_root: Any) -> None:
    sb = factory.create(network="nat", allow=["127.0.0.1:1"])
    chain = egress.chain_name(sb.id)
    assert chain in egress.installed()
    sb.kill()
    assert chain not in egress.installed()
    assert_no_leftovers(state_root)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"network": "bogus"},
        {"allow": ["127.0.0.1"]},  # needs a network
        {"ports": [8000]},
        {"network": "nat", "ports": [0]},
        {"network": "nat", "ports": [8000, 8000]},
        {"network": "nat", "allow": ["10.0.0.0/33"]},
        {"network": "nat", "allow": ["host name with spaces"]},
        {"network": "nat", "allow": ["127.0.0.1:99999"]},
        {"network": "nat", "allow": "127.0.0.1"},
    ],
)
def test_bad_network_input_is_refused_before_anything_starts(
    kwargs: dict[str, Any], state_root: Any
) -> None:
    with pytest.raises(ConfigError):
        Sandbox.create(**kwargs)
    assert_no_leftovers(state_root)


@root_only
def test_unresolvable_allowed_host_fails_cleanly(
    state_root: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[str] = []  # the id the create drew (it fails before making anything)

    def recorded() -> str:
        drawn.append(new_sandbox_id())
        return drawn[-1]

    monkeypatch.setattr(sandbox_module, "new_sandbox_id", recorded)
    with pytest.raises(NetworkError, match="resolve"):
        Sandbox.create(network="nat", allow=["no-such-host.invalid"])
    assert_no_leftovers(state_root)
    assert_no_leftovers(state_root, drawn)  # no policy, group or TAP under that id


@root_only
def test_gc_removes_a_policy_no_vmm_uses(factory: Any) -> None:
    """An owner killed at the wrong moment can leave a policy behind: gc removes it, and
    leaves alone the policy of a sandbox that runs."""
    from novasandbox.gc import sweep_host_resources
    from novasandbox.host.plan import VMM_ID_BASE, VMM_ID_COUNT

    live = factory.create(network="nat", allow=["127.0.0.1:1"])
    orphan_uid = VMM_ID_BASE + VMM_ID_COUNT - 1
    egress.apply("sb-orphan00001", orphan_uid, ())
    assert "sb-orphan00001" in egress.installed()
    removed = sweep_host_resources()["egress_policies"]
    assert "sb-orphan00001" in removed  # (and whatever stray policy others left)
    installed = egress.installed()
    assert "sb-orphan00001" not in installed
    assert egress.chain_name(live.id) in installed


# --------------------------------------------------------------------------- tap


@pytest.mark.parametrize("cold", [False, True], ids=["restored", "cold"])
def test_tap_egress_policy_and_exposed_port(
    factory: Any, namespaces: Namespaces, cold: bool
) -> None:
    sb = factory.create(cold=cold, network="tap", allow=["10.250.0.2:9001"], ports=[8000])
    assert sb.restored is (not cold)
    holders = dict((t.name, holder) for t, holder in tap.leases())
    leased = next(name for name, holder in holders.items() if holder == sb.id)
    assert leased in ("nstap0", "nstap1")  # from the pool, not a fresh device
    mac = sb.commands.run("cat /sys/class/net/eth0/address").stdout.strip()
    assert mac == guest_mac(sb.id)
    assert fetch(sb, "http://10.250.0.2:9001/hostname")[0] == 0
    code, out = fetch(sb, "http://10.250.0.2:9002/hostname")
    assert code == 3 and "failed" in out
    # the host (the inner namespace) reaches the guest at its own address
    sb.commands.start(["python3", "-m", "http.server", "8000", "--directory", "/etc"])
    host = sb.get_host(8000)
    assert host.startswith("10.201.") and host.endswith(":8000")
    assert "sandbox" in namespaces.wait_http(namespaces.inner, f"http://{host}/hostname")
    chain = egress.chain_name(sb.id)
    assert chain in egress.installed(tap.table())
    sb.kill()
    assert chain not in egress.installed(tap.table())
    assert dict((t.name, h) for t, h in tap.leases())[leased] is None  # back in the pool


def test_tap_without_a_free_device_gets_a_fresh_one(factory: Any, namespaces: Namespaces) -> None:
    boxes = [factory.create(network="tap", allow=[]) for _ in range(3)]
    holders = {holder: t.name for t, holder in tap.leases() if holder}
    names = [holders[sb.id] for sb in boxes]
    assert sorted(names) == ["nstap0", "nstap1", "nstap2"]
    assert names[2] == "nstap2"  # the pool has two; the third was made for it
    for sb in boxes:
        sb.kill()
    remaining = [t.name for t in tap.existing()]
    assert remaining == ["nstap0", "nstap1"]  # the fresh one went with its sandbox


def test_tap_forks_get_their_own_device_mac_and_network(
    factory: Any, namespaces: Namespaces
) -> None:
    parent = factory.create(network="tap", allow=["10.250.0.2:9001"])
    children = [factory.track(c) for c in parent.fork(2)]
    holders = {holder: t.name for t, holder in tap.leases() if holder}
    assert len({holders[s.id] for s in (parent, *children)}) == 3
    for child in children:
        assert child.commands.run("cat /sys/class/net/eth0/address").stdout.strip() == (
            guest_mac(child.id)
        )
        assert fetch(child, "http://10.250.0.2:9001/hostname")[0] == 0


def test_gc_ends_leases_of_dead_sandboxes_and_a_dead_owners_pool(
    factory: Any, namespaces: Namespaces
) -> None:
    from novasandbox.gc import sweep_host_resources

    live = factory.create(network="tap", allow=[])
    live_tap = {holder: t for t, holder in tap.leases() if holder}[live.id]
    # leases whose sandboxes do not exist: the pool's other TAP, then fresh ones
    leases = [tap.acquire(f"sb-gone000000{i}") for i in range(2)]
    assert [made for _, made in leases] == [False, True]
    fresh = leases[1][0]
    assert sweep_host_resources()["taps"] == []  # too young: a create may be under way
    past = time.time() - tap.LEASE_GRACE_S - 5
    for t in (live_tap, *(t for t, _ in leases)):
        os.utime(tap.lease_path(t), (past, past))
    # and a pool prepared by a process that has exited
    owner = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    tap.prepare(2, owner=(int(owner.stdout), 1))
    removed = sweep_host_resources()["taps"]
    assert fresh.name in removed
    # the live sandbox keeps its TAP (QEMU holds it) and the rest of the pool is gone
    assert [t.name for t in tap.existing()] == [live_tap.name]
    assert {holder for _, holder in tap.leases()} == {live.id}
    assert fetch(live, "http://10.250.0.2:9001/")[0] == 3  # still attached, still walled in
    live.kill()
    tap.prepare(2)  # what the other tests of this module expect


OWNER = """
import sys
from novasandbox import Sandbox
sb = Sandbox.create(network="nat", allow=["127.0.0.1:1"])
print(sb.id, flush=True)
if sys.argv[1] == "wait":
    import time
    time.sleep(600)
# "exit": leave without killing it
"""


@root_only
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_policy_of_an_abandoned_sandbox_goes(state_root: Any, how: str) -> None:
    """An owner that exits without killing its networked sandbox (the atexit hook kills
    it), or that is SIGKILLed (gc reaps it): the VMM, its control group and its egress
    policy all go."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, "wait" if how == "sigkill" else "exit"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("sb-")
        if how == "sigkill":
            assert egress.chain_name(sandbox_id) in egress.installed()
            owner.kill()
        owner.wait(timeout=60)
        if how == "sigkill":
            cli = subprocess.run(
                [sys.executable, "-m", "novasandbox.cli", "gc"], capture_output=True, text=True
            )
            assert sandbox_id in cli.stdout
        assert egress.chain_name(sandbox_id) not in egress.installed()
        assert_no_leftovers(state_root)
    finally:
        owner.kill()


def test_a_vanished_pool_tap_is_a_clear_error(
    factory: Any, namespaces: Namespaces, state_root: Any
) -> None:
    first = factory.create(network="tap", allow=[])
    holders = {holder: t.name for t, holder in tap.leases() if holder}
    other = "nstap1" if holders[first.id] == "nstap0" else "nstap0"
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{namespaces.inner}", "ip", "link", "del", other], check=True
    )
    try:
        with pytest.raises(NetworkError, match="not a prepared TAP"):
            factory.create(network="tap", allow=[])
        assert not any(holder and holder != first.id for _, holder in tap.leases())
        assert other not in [t.name for t in tap.existing()]  # not re-made unaddressed
    finally:
        tap.prepare(2)
    first.kill()
    assert_no_leftovers(state_root)


# ------------------------------------------------- no root: the seccomp guard


@pytest.fixture
def unconfined(monkeypatch: pytest.MonkeyPatch) -> None:
    """VMMs that keep this process's uid, as without root: no nftables rule can be keyed
    on them, so the seccomp guard decides their egress."""
    monkeypatch.setenv("NOVASANDBOX_DROP_PRIVILEGES", "0")


@pytest.mark.parametrize("cold", [False, True], ids=["restored", "cold"])
def test_seccomp_guard_enforces_the_policy_without_privileges(
    factory: Any, servers: tuple[HostServer, HostServer], unconfined: None, cold: bool
) -> None:
    allowed, other = servers
    sb = factory.create(cold=cold, network="nat", allow=[f"127.0.0.1:{allowed.port}"], ports=[8000])
    info = next(i for i in Sandbox.list() if i.id == sb.id)
    assert info.vmm_uid is None and info.pid is not None
    assert egress.chain_name(sb.id) not in egress.installed()  # no nftables involved
    status = Path(f"/proc/{info.pid}/status").read_text()
    assert "Seccomp_filters:\t2" in status  # the guard's, then QEMU's own
    assert fetch(sb, f"http://{GATEWAY}:{allowed.port}/") == (0, "allowed")
    code, out = fetch(sb, f"http://{GATEWAY}:{other.port}/")
    assert code == 3 and "failed" in out
    assert other.hits == 0
    sb.files.write("/srv/index.html", "guarded", user="root")
    sb.commands.start(["python3", "-m", "http.server", "8000", "--directory", "/srv"])
    deadline = time.monotonic() + 30
    while True:
        try:
            body = urllib.request.urlopen(f"http://{sb.get_host(8000)}/index.html", timeout=5)
            assert body.read() == b"guarded"
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


GUARDED_OWNER = """
import sys, time
from novasandbox import Sandbox
sb = Sandbox.create(network="nat", allow=[f"127.0.0.1:{sys.argv[1]}"])
loop = (
    "import time, urllib.request\\n"
    "while True:\\n"
    "    try: urllib.request.urlopen('http://10.0.2.2:%s/', timeout=2).read()\\n"
    "    except Exception: pass\\n"
    "    time.sleep(0.2)\\n" % sys.argv[1]
)
sb.commands.start(["python3", "-c", loop])
print(sb.id, flush=True)
time.sleep(600)
"""


def test_seccomp_guard_fails_closed_when_its_owner_dies(
    servers: tuple[HostServer, HostServer], unconfined: None, state_root: Any
) -> None:
    allowed, _ = servers
    owner = subprocess.Popen(
        [sys.executable, "-c", GUARDED_OWNER, str(allowed.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("sb-")
        deadline = time.monotonic() + 60
        while allowed.hits < 3:  # the guest reaches the allowed server, again and again
            assert time.monotonic() < deadline
            time.sleep(0.1)
        owner.kill()
        owner.wait()
        time.sleep(1)
        hits = allowed.hits
        time.sleep(3)
        # the VM still runs (until gc), but with nobody to ask, its connects fail
        assert allowed.hits == hits
        assert len(vmm_pids_under(state_root)) == 1
        r = subprocess.run(
            [sys.executable, "-m", "novasandbox.cli", "gc"], capture_output=True, text=True
        )
        assert sandbox_id in r.stdout
        assert_no_leftovers(state_root)
    finally:
        owner.kill()
