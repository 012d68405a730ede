"""Network configuration, allow-list parsing, the nftables policy text and QEMU's network
options: all pure."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import struct
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from novasandbox.config import MachineConfig
from novasandbox.errors import ConfigError, NetworkError
from novasandbox.host import egress
from novasandbox.host.plan import (
    VMM_ID_BASE,
    VMM_ID_COUNT,
    Confinement,
    Enforcement,
    HostPlan,
    make_plan,
)
from novasandbox.network import (
    DETACHED,
    NON_PUBLIC,
    EgressRule,
    NetworkConfig,
    NetworkMode,
    guest_mac,
    is_public,
    parse_allow,
    resolve,
)
from novasandbox.sandbox import _egress_rules
from novasandbox.vm.base import VMPaths, VMSpec
from novasandbox.vm.qemu_argv import network_argv


def test_parse_allow_forms() -> None:
    assert parse_allow("1.2.3.4") == parse_allow("1.2.3.4")
    e = parse_allow("1.2.3.4")
    assert (e.network, e.host, e.port) == (IPv4Network("1.2.3.4/32"), None, None)
    e = parse_allow("10.0.0.0/8:443")
    assert (e.network, e.port) == (IPv4Network("10.0.0.0/8"), 443)
    e = parse_allow("10.1.2.3/8")  # host bits are dropped, not an error
    assert e.network == IPv4Network("10.0.0.0/8")
    e = parse_allow("Example.COM.:80")
    assert (e.network, e.host, e.port) == (None, "example.com", 80)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " 1.2.3.4",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:http",
        "10.0.0.0/33",
        "a b",
        "-bad.example",
        "300.1.1.1",
        "::1",
        "[::1]:80",
        "host/24",
        "a..b",
    ],
)
def test_parse_allow_refuses(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_allow(bad)


def test_network_config_validation() -> None:
    assert NetworkConfig().mode == "none"
    assert not NetworkConfig().enabled
    net = NetworkConfig("nat", ["1.2.3.4:80"], [8000, 8001])  # type: ignore[arg-type]
    assert net.allow == ("1.2.3.4:80",) and net.ports == (8000, 8001)
    assert NetworkConfig("nat", ()).allow == ()
    assert NetworkConfig("tap", None, (22,)).enabled
    assert NetworkConfig(DETACHED).enabled
    for bad in (
        {"mode": "bridge"},
        {"mode": "NAT"},
        {"mode": None},
        {"mode": ["nat"]},
        {"mode": DETACHED, "ports": (80,)},
        {"mode": "none", "allow": ()},
        {"mode": "none", "ports": (80,)},
        {"mode": "nat", "ports": (True,)},
        {"mode": "nat", "ports": "80"},
        {"mode": "nat", "ports": (80, 80)},
        {"mode": "nat", "allow": "1.2.3.4"},
        {"mode": "nat", "allow": ("1.2.3.4:x",)},
    ):
        with pytest.raises(ConfigError):
            NetworkConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MachineConfig(network="nat")  # type: ignore[arg-type]


def test_the_mode_is_an_enum_and_strings_still_work() -> None:
    for mode in NetworkMode:
        net = NetworkConfig(mode.value)
        assert net.mode is mode and net.mode == mode.value and f"{net.mode}" == mode.value
        assert NetworkConfig(mode) == net
    assert [m.value for m in NetworkMode] == ["none", "nat", "tap"]
    assert json.dumps({"network": NetworkConfig("nat").mode}) == '{"network": "nat"}'


def test_detached_is_internal_only() -> None:
    """Only the object itself (the template snapshot build) gets the device without a
    backend; the string, however it is spelt, is refused like any unknown mode."""
    assert NetworkConfig(DETACHED).mode is DETACHED
    for text in ("detached", "".join(["de", "tached"]), str(DETACHED)):
        with pytest.raises(ConfigError, match="none, nat, tap") as info:
            NetworkConfig(text)
        assert info.value.code == "invalid-config"
    assert DETACHED == "detached"  # still compares as the string the records hold


def test_resolve_uses_the_lookup_and_dedups() -> None:
    entries = [parse_allow("a.example:443"), parse_allow("1.2.3.4:443")]
    rules = resolve(entries, lookup=lambda host: [IPv4Address("1.2.3.4"), IPv4Address("5.6.7.8")])
    assert rules == (
        EgressRule(IPv4Network("1.2.3.4/32"), 443),
        EgressRule(IPv4Network("5.6.7.8/32"), 443),
    )

    def failing(host: str) -> list[IPv4Address]:
        raise OSError("no such host")

    with pytest.raises(NetworkError, match=r"a\.example"):
        resolve(entries, lookup=failing)
    with pytest.raises(NetworkError):
        resolve(entries, lookup=lambda host: [])


def test_non_public_ranges() -> None:
    for private in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.1.1",
        "172.16.0.1",
        "169.254.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "0.0.0.0",
    ):
        assert not is_public(IPv4Address(private))
    assert is_public(IPv4Address("1.1.1.1"))
    assert IPv4Network("127.0.0.0/8") in NON_PUBLIC


def test_guest_mac_is_local_unicast_and_per_sandbox() -> None:
    mac = guest_mac("sb-1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert len(mac.split(":")) == 6
    assert guest_mac("sb-1") == mac != guest_mac("sb-2")


def test_policy_script_allow_list() -> None:
    rules = [EgressRule(IPv4Network("127.0.0.1/32"), 8080), EgressRule(IPv4Network("1.2.3.0/24"))]
    script = egress.sandbox_script("sb-abc", VMM_ID_BASE + 5, rules, [IPv4Address("9.9.9.9")])
    lines = script.splitlines()
    assert lines[0] == "add chain inet novasandbox sb-abc"
    assert "ct state established,related accept" in lines[1]
    assert any("ip daddr 9.9.9.9 udp dport 53 accept" in line for line in lines)
    assert any(
        "ip daddr 127.0.0.1/32 meta l4proto { tcp, udp } th dport 8080 accept" in line
        for line in lines
    )
    assert any(line.endswith("sb-abc ip daddr 1.2.3.0/24 accept") for line in lines)
    assert lines[-2].endswith("sb-abc counter reject")  # nothing else, counted
    assert lines[-3].endswith("sb-abc meta l4proto tcp counter reject with tcp reset")
    assert " log " not in script  # no NFLOG group given: counted only
    assert "nfproto ipv4 accept" not in script  # no public default
    assert (
        lines[-1] == f"add element inet novasandbox sandboxes {{ {VMM_ID_BASE + 5} : jump sb-abc }}"
    )


def test_policy_script_public_default_rejects_non_public_first() -> None:
    script = egress.sandbox_script("sb-x", VMM_ID_BASE, None, [])
    lines = script.splitlines()
    private = next(i for i, line in enumerate(lines) if "10.0.0.0/8" in line)
    public = next(i for i, line in enumerate(lines) if "nfproto ipv4 accept" in line)
    assert private < public
    for net in NON_PUBLIC:
        assert str(net) in lines[private]


def refusal_rules(script: str) -> list[str]:
    return [line for line in script.splitlines() if " reject" in line or " drop" in line]


def test_policy_script_logs_and_counts_every_refusal() -> None:
    """Each refusing rule is preceded by a rate-limited NFLOG rule whose prefix names the
    sandbox and the rule, and counts what it refuses."""
    group = 20051
    lists = {
        "allow-list": [EgressRule(IPv4Network("1.2.3.4/32"), 443)],
        "no-egress": [],
        None: None,  # the public internet
    }
    for code, rules in lists.items():
        script = egress.sandbox_script("sb-abc", 7, rules, [], log_group=group)
        lines = script.splitlines()
        for i, line in enumerate(lines):
            if line.endswith(" reject") or line.endswith("reject with tcp reset"):
                assert " counter reject" in line
                log = lines[i - 1] if " log " in lines[i - 1] else lines[i - 2]
                assert " limit rate 50/second burst 100 packets log group 20051 " in log
                assert 'prefix "nsb:sb-abc:' in log
        prefixes = [line.split('prefix "', 1)[1].rstrip('"') for line in lines if " log " in line]
        if code is None:  # non-public ranges, then anything not IPv4
            assert prefixes == ["nsb:sb-abc:non-public", "nsb:sb-abc:not-ipv4"]
            private = next(line for line in lines if " log " in line)
            assert all(str(net) in private for net in NON_PUBLIC)
        else:
            assert prefixes == [f"nsb:sb-abc:{code}"]
        # the log rule matches what its reject rule matches, and gives no verdict
        for line in lines:
            if " log " in line:
                assert not line.endswith(("accept", "reject", "drop"))
                assert "snaplen 96" in line
    tap = egress.tap_table("10.201.0.0/16", "nstap", None)
    script = egress.sandbox_script(
        "sb-t", "nstap3", (), [], tap, IPv4Address("10.201.0.14"), log_group=group
    )
    lines = script.splitlines()
    assert lines[1] == (
        "add rule ip novasandbox_tap sb-t ip saddr != 10.201.0.14 limit rate 50/second "
        'burst 100 packets log group 20051 snaplen 96 prefix "nsb:sb-t:source"'
    )
    assert lines[2] == "add rule ip novasandbox_tap sb-t ip saddr != 10.201.0.14 counter drop"
    assert all("counter" in line for line in refusal_rules(script))


def test_chain_counters_sum_the_refusals() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "inet", "table": "novasandbox", "name": "sb-x"}},
            {"rule": {"expr": [{"match": {}}, {"accept": None}]}},
            {"rule": {"expr": [{"limit": {"rate": 50}}, {"log": {"group": 5}}]}},
            {"rule": {"expr": [{"counter": {"packets": 3, "bytes": 180}}, {"reject": {}}]}},
            {"rule": {"expr": [{"counter": {"packets": 4, "bytes": 120}}, {"reject": None}]}},
        ]
    }
    assert egress.chain_counters(json.dumps(listing)) == 7
    assert egress.chain_counters("not json") is None
    assert egress.chain_counters("[]") is None
    assert egress.chain_counters('{"nftables": []}') == 0


def test_base_and_remove_scripts() -> None:
    base = egress.base_script()
    uids = f"{VMM_ID_BASE}-{VMM_ID_BASE + VMM_ID_COUNT - 1}"
    assert f"meta skuid {uids} meta skuid vmap @sandboxes" in base
    # a VMM whose uid has no policy gets nothing
    assert base.index("vmap @sandboxes") < base.index(f"meta skuid {uids} reject")
    remove = egress.remove_script("sb-abc", 7)
    assert remove.splitlines() == [
        "delete element inet novasandbox sandboxes { 7 }",
        "flush chain inet novasandbox sb-abc",
        "delete chain inet novasandbox sb-abc",
    ]


def test_tap_policy_table_is_keyed_on_the_interface() -> None:
    table = egress.tap_table("10.201.0.0/16", "nstap", "ns1")
    base = egress.base_script(table)
    assert "add table ip novasandbox_tap" in base
    assert "type ifname : verdict" in base
    assert 'forward iifname "nstap*" iifname vmap @sandboxes' in base
    assert 'input iifname "nstap*" iifname vmap @sandboxes' in base
    assert 'ip saddr 10.201.0.0/16 oifname != "nstap*" masquerade' in base
    script = egress.sandbox_script("sb-t", "nstap3", (), [], table, IPv4Address("10.201.0.14"))
    # a guest cannot send from an address that is not its own
    assert script.splitlines()[1] == (
        "add rule ip novasandbox_tap sb-t ip saddr != 10.201.0.14 counter drop"
    )
    assert script.splitlines()[-1] == (
        'add element ip novasandbox_tap sandboxes { "nstap3" : jump sb-t }'
    )
    assert egress.remove_script("sb-t", "nstap3", table).startswith(
        'delete element ip novasandbox_tap sandboxes { "nstap3" }'
    )


def test_tap_addressing() -> None:
    from novasandbox.host.tap import MAX_TAPS, Tap, tap_index

    t = Tap(0)
    assert (t.name, str(t.network), str(t.host_address), str(t.guest_address)) == (
        "nstap0",
        "10.201.0.0/30",
        "10.201.0.1",
        "10.201.0.2",
    )
    t = Tap(70)
    assert str(t.network) == "10.201.1.24/30"
    assert str(Tap(MAX_TAPS - 1).guest_address) == "10.201.255.254"
    assert tap_index("nstap12") == 12
    assert tap_index("eth0") is None and tap_index("nstapx") is None


def test_snapshot_network_compatibility(tmp_path: Path) -> None:
    from novasandbox.snapshots import Snapshot

    def snap(network: str) -> Snapshot:
        return Snapshot(
            id="s",
            kind="user",
            template="t",
            directory=tmp_path,
            kernel=tmp_path,
            vcpus=1,
            memory_mib=256,
            accel="tcg",
            qemu_version="q",
            created_at=0.0,
            network=network,
        )

    snap("none").check_network("none")
    snap("nat").check_network("nat")
    for mode in ("nat", "tap"):
        snap("detached").check_network(mode)
        snap("tap").check_network(mode)
    for saved, mode in (("none", "nat"), ("nat", "tap"), ("nat", "none"), ("detached", "none")):
        with pytest.raises(ConfigError, match="network"):
            snap(saved).check_network(mode)


def test_host_resolvers() -> None:
    text = "# comment\nnameserver 10.0.0.53\nnameserver ::1\nsearch x\nnameserver 1.1.1.1\n"
    assert egress.host_resolvers(text) == [IPv4Address("10.0.0.53"), IPv4Address("1.1.1.1")]


def spec(
    tmp_path: Path,
    net: NetworkConfig,
    host_ports: dict[int, int],
    confine: Confinement | None = None,
) -> VMSpec:
    ports = [host_ports[p] for p in net.ports]
    machine = MachineConfig(network=net)
    return VMSpec(
        vm_id="sb-net",
        machine=machine,
        kernel=tmp_path / "vmlinux",
        rootfs=tmp_path / "rootfs.ext4",
        paths=VMPaths(tmp_path),
        accel="tcg",
        host=make_plan("sb-net", net, 1, 256, confine=confine, free_ports=ports),
    )


def test_network_argv(tmp_path: Path) -> None:
    assert network_argv(spec(tmp_path, NetworkConfig(), {})) == []
    argv = network_argv(spec(tmp_path, NetworkConfig("nat", None, (8000,)), {8000: 40001}))
    assert argv[0] == "-netdev" and argv[2] == "-device"
    netdev = argv[1].split(",")
    assert netdev[:2] == ["user", "id=net0"]
    assert "net=10.0.2.0/24" in netdev and "host=10.0.2.2" in netdev and "dns=10.0.2.3" in netdev
    assert "ipv6=off" in netdev
    assert "restrict=off" in netdev
    assert "hostfwd=tcp:127.0.0.1:40001-:8000" in netdev
    assert argv[3] == f"virtio-net-device,mac={guest_mac('sb-net')},netdev=net0"
    closed = network_argv(spec(tmp_path, NetworkConfig("nat", ()), {}))
    # no root: the seccomp guard refuses (and reports) what slirp's restrict=on would
    # have dropped silently
    assert "restrict=off" in closed[1].split(",")
    confined = spec(tmp_path, NetworkConfig("nat", ()), {}, Confinement(1, 1))
    assert "restrict=off" in network_argv(confined)[1].split(",")  # the host policy decides
    tap = network_argv(spec(tmp_path, NetworkConfig("tap"), {}, Confinement(1, 1)), tap_fd=17)
    assert tap[:2] == ["-netdev", "tap,id=net0,fd=17,vhost=off"]
    assert tap[3].endswith(",netdev=net0")
    with pytest.raises(ValueError):  # no descriptor
        network_argv(spec(tmp_path, NetworkConfig("tap"), {}, Confinement(1, 1)))
    # the template snapshot's device has no backend, so it restores into nat or tap
    assert network_argv(spec(tmp_path, NetworkConfig(DETACHED), {})) == [
        "-device",
        f"virtio-net-device,mac={guest_mac('sb-net')}",
    ]


def test_the_host_plan_decides_who_enforces_once() -> None:
    confined = Confinement(VMM_ID_BASE, VMM_ID_BASE)

    def plan(
        net: NetworkConfig, confine: Confinement | None = None, ports: tuple[int, ...] = ()
    ) -> HostPlan:
        return make_plan("sb-plan", net, 2, 512, confine=confine, free_ports=ports)

    none = plan(NetworkConfig())
    assert (none.enforcement, none.guest, none.dns) == (Enforcement.NOTHING, None, False)
    assert none.limits is not None and none.limits.tasks > 2
    guard = plan(NetworkConfig("nat", None, (8000,)), ports=(40001,))
    assert guard.enforcement is Enforcement.GUARD and guard.host_ports == {8000: 40001}
    assert guard.guest is not None and guard.guest.dns == "10.0.2.3" and guard.dns
    closed = plan(NetworkConfig("nat", ()))
    assert closed.enforcement is Enforcement.GUARD  # also with nothing allowed: it reports
    assert closed.guest is not None and closed.guest.dns == "" and not closed.dns
    uid = plan(NetworkConfig("nat", ("1.2.3.4:80",)), confined)
    assert uid.enforcement is Enforcement.NFT_UID and uid.vmm_uid == VMM_ID_BASE
    tap = plan(NetworkConfig("tap"), confined)
    assert tap.enforcement is Enforcement.NFT_TAP and tap.guest is None  # from its lease
    detached = plan(NetworkConfig(DETACHED))
    assert detached.enforcement is Enforcement.NOTHING and detached.guest is not None
    assert detached.guest.dns == ""
    with pytest.raises(NetworkError, match="tap"):
        plan(NetworkConfig("tap"))  # not root
    with pytest.raises(ValueError):
        plan(NetworkConfig("nat", None, (8000,)))  # no host port for it
    assert not make_plan("sb-x", NetworkConfig(), 1, 256, confine=None, cgroups=False).limits
    # the record keeps it: it reads back equal
    for p in (none, guard, closed, uid, tap, detached):
        assert HostPlan.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_egress_rules_are_resolved() -> None:
    assert asyncio.run(_egress_rules(NetworkConfig())) == ()
    assert asyncio.run(_egress_rules(NetworkConfig("nat", ()))) == ()
    assert asyncio.run(_egress_rules(NetworkConfig("nat", None))) is None
    rules = asyncio.run(_egress_rules(NetworkConfig("nat", ("1.2.3.4:80",))))
    assert rules == (EgressRule(IPv4Network("1.2.3.4/32"), 80),)


def test_parse_sockaddr_and_refusal() -> None:
    from novasandbox.host.netguard import parse_sockaddr, refusal

    raw = struct.pack("H", socket.AF_INET) + struct.pack("!H", 8080) + bytes([127, 0, 0, 1])
    family, ip, port = parse_sockaddr(raw + bytes(8))
    assert (family, str(ip), port) == (socket.AF_INET, "127.0.0.1", 8080)

    def only_8080(address: IPv4Address, port: int) -> str | None:
        return None if port == 8080 else "allow-list"

    assert refusal(family, ip, 8080, only_8080) is None
    assert refusal(family, ip, 8081, only_8080) == "allow-list"
    assert refusal(socket.AF_UNIX, None, 0, only_8080) is None  # local sockets: not egress
    assert refusal(socket.AF_INET6, None, 0, only_8080) == "not-ipv4"  # no IPv6 at all
    assert parse_sockaddr(b"\x02") == (-1, None, 0)


def test_egress_allows_matches_the_nftables_policy() -> None:
    from novasandbox.network import egress_allows

    rules = (EgressRule(IPv4Network("127.0.0.1/32"), 8080), EgressRule(IPv4Network("1.2.3.0/24")))
    resolvers = [IPv4Address("10.9.9.9")]
    assert egress_allows(rules, IPv4Address("127.0.0.1"), 8080, resolvers)
    assert not egress_allows(rules, IPv4Address("127.0.0.1"), 8081, resolvers)
    assert egress_allows(rules, IPv4Address("1.2.3.77"), 1, resolvers)
    assert egress_allows(rules, IPv4Address("10.9.9.9"), 53, resolvers)
    assert not egress_allows(rules, IPv4Address("10.9.9.9"), 54, resolvers)
    assert not egress_allows(rules, IPv4Address("8.8.8.8"), 443, resolvers)
    assert egress_allows(None, IPv4Address("8.8.8.8"), 443)  # the public internet
    assert not egress_allows(None, IPv4Address("192.168.1.1"), 443)
    assert not egress_allows((), IPv4Address("8.8.8.8"), 443)


def test_egress_refusal_names_the_rule() -> None:
    from novasandbox.network import describe_refusal, egress_refusal

    rules = (EgressRule(IPv4Network("1.2.3.0/24"), 443),)
    resolvers = [IPv4Address("10.9.9.9")]
    assert egress_refusal(rules, IPv4Address("1.2.3.4"), 443, resolvers) is None
    assert egress_refusal(rules, IPv4Address("1.2.3.4"), 80, resolvers) == "allow-list"
    assert egress_refusal((), IPv4Address("1.2.3.4"), 80) == "no-egress"
    assert egress_refusal((), IPv4Address("10.9.9.9"), 53, resolvers) is None
    assert egress_refusal(None, IPv4Address("203.0.113.80"), 443) == "non-public"
    assert egress_refusal(None, IPv4Address("8.8.8.8"), 443) is None
    assert describe_refusal("non-public", "203.0.113.80") == "non-public range 203.0.113.0/24"
    assert describe_refusal("non-public", "10.1.2.3") == "non-public range 10.0.0.0/8"
    assert describe_refusal("allow-list", "1.2.3.4") == "not in the allow list"
    assert describe_refusal("no-egress", "1.2.3.4") == "no egress at all (allow=[])"
    assert describe_refusal("something-new", "1.2.3.4") == "something-new"


def test_network_log_summary_and_json_round_trip() -> None:
    from novasandbox.network import NetworkLog, RefusedConnection

    a = RefusedConnection(1.0, "tcp", "203.0.113.80", 443, "non-public range 203.0.113.0/24")
    b = RefusedConnection(2.0, "udp", "10.0.0.1", 53, "non-public range 10.0.0.0/8")
    c = RefusedConnection(3.0, "icmp", "10.0.0.2", None, "non-public range 10.0.0.0/8")
    assert c.destination == "icmp 10.0.0.2" and a.destination == "tcp 203.0.113.80:443"
    assert RefusedConnection.from_json(a.to_json()) == a
    assert RefusedConnection.from_json(c.to_json()) == c
    for bad in ([], {"time": "x"}, {**a.to_json(), "port": True}, {**a.to_json(), "rule": 1}):
        assert RefusedConnection.from_json(bad) is None
    one = NetworkLog(1, (a,))
    assert one.summary() == (
        "the network policy refused 1 connection: tcp 203.0.113.80:443 "
        "(non-public range 203.0.113.0/24)"
    )
    many = NetworkLog(9, (a, a, b, c, c))
    assert many.not_listed == 4
    assert many.summary(limit=2) == (
        "the network policy refused 9 connections: tcp 203.0.113.80:443 (non-public range "
        "203.0.113.0/24), udp 10.0.0.1:53 (non-public range 10.0.0.0/8) and 1 more"
    )
    assert NetworkLog(0, ()).to_json() == {"refused": 0, "entries": []}


CONNECTS = """
import socket, sys
out = []
for port in sys.argv[1:]:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", int(port)))
        out.append("ok")
    except OSError as exc:
        out.append(exc.errno)
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("127.0.0.1", int(sys.argv[2])))  # denied port, over UDP
    out.append("sent")
except OSError as exc:
    out.append(exc.errno)
print(out)
"""


def test_seccomp_guard_decides_every_connect_of_a_real_process() -> None:
    """The stage installs the filter and execs a program; the guard in this process lets
    its connect to one port through and refuses the other (TCP and UDP)."""
    from novasandbox.host import netguard

    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    allowed, denied = (s.getsockname()[1] for s in listeners)

    def refuse(address: IPv4Address, port: int) -> str | None:
        return None if port == allowed else "allow-list"

    heard: list[tuple[str, str, int | None, str]] = []

    async def run() -> tuple[str, netguard.Guard]:
        ours, theirs = socket.socketpair()
        argv = netguard.stage_argv(sys.executable, theirs.fileno())
        argv += [sys.executable, "-c", CONNECTS, str(allowed), str(denied)]
        proc = subprocess.Popen(
            argv, pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, text=True
        )
        theirs.close()
        listener = await asyncio.to_thread(netguard.receive_listener, ours, 30.0)
        ours.close()
        guard = netguard.Guard(listener, refuse, lambda *refused: heard.append(refused))
        guard.attach(asyncio.get_running_loop())
        out, _ = await asyncio.to_thread(proc.communicate)
        guard.close()
        return out, guard

    try:
        out, guard = asyncio.run(run())
    finally:
        for s in listeners:
            s.close()
    assert out.strip() == f"['ok', {errno.ECONNREFUSED}, {errno.ECONNREFUSED}]"
    assert guard.allowed == 1 and guard.denied == 2
    # each refusal is reported with its protocol (asked of the socket), destination, rule
    assert heard == [
        ("tcp", "127.0.0.1", denied, "allow-list"),
        ("udp", "127.0.0.1", denied, "allow-list"),
    ]


def test_without_its_guard_the_filter_fails_closed() -> None:
    """If the owner is gone (the listener closed), filtered calls fail instead of
    going through."""
    from novasandbox.host import netguard

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ours, theirs = socket.socketpair()
    argv = netguard.stage_argv(sys.executable, theirs.fileno())
    argv += [sys.executable, "-c", "import time; time.sleep(0.5)\n" + CONNECTS, str(port), "1"]
    proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, text=True)
    theirs.close()
    listener = netguard.receive_listener(ours, 30.0)
    os.close(listener)  # nobody will answer
    out, _ = proc.communicate(timeout=60)
    server.close()
    assert "ok" not in out
    assert str(errno.ENOSYS) in out
