"""Network configuration, allow-list parsing, the nftables policy text and QEMU's network
options: all pure."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from novasandbox.config import MachineConfig
from novasandbox.errors import ConfigError, NetworkError
from novasandbox.network import (
    NON_PUBLIC,
    EgressRule,
    NetworkConfig,
    guest_mac,
    is_public,
    parse_allow,
    resolve,
)
from novasandbox.providers import egress
from novasandbox.providers.base import VMM_ID_BASE, VMM_ID_COUNT, Confinement, VMPaths, VMSpec
from novasandbox.providers.qemu import network_argv
from novasandbox.sandbox import _egress_rules


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
    assert NetworkConfig("detached").enabled
    for bad in (
        {"mode": "bridge"},
        {"mode": "detached", "ports": (80,)},
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
    assert lines[-2].endswith("sb-abc reject")  # nothing else
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
    assert script.splitlines()[1] == "add rule ip novasandbox_tap sb-t ip saddr != 10.201.0.14 drop"
    assert script.splitlines()[-1] == (
        'add element ip novasandbox_tap sandboxes { "nstap3" : jump sb-t }'
    )
    assert egress.remove_script("sb-t", "nstap3", table).startswith(
        'delete element ip novasandbox_tap sandboxes { "nstap3" }'
    )


def test_tap_addressing() -> None:
    from novasandbox.providers.tap import MAX_TAPS, Tap, tap_index

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


def spec(tmp_path: Path, net: NetworkConfig, host_ports: dict[int, int]) -> VMSpec:
    return VMSpec(
        vm_id="sb-net",
        machine=MachineConfig(network=net),
        kernel=tmp_path / "vmlinux",
        rootfs=tmp_path / "rootfs.ext4",
        paths=VMPaths(tmp_path),
        accel="tcg",
        host_ports=host_ports,
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
    assert "restrict=on" in closed[1].split(",")  # no root, so no host policy: slirp's own
    confined = replace(spec(tmp_path, NetworkConfig("nat", ()), {}), confine=Confinement(1, 1))
    assert "restrict=off" in network_argv(confined)[1].split(",")  # the host policy decides
    with pytest.raises(ValueError):
        network_argv(spec(tmp_path, NetworkConfig("nat", None, (8000,)), {}))
    tap = network_argv(spec(tmp_path, NetworkConfig("tap"), {}), tap_fd=17)
    assert tap[:2] == ["-netdev", "tap,id=net0,fd=17,vhost=off"]
    assert tap[3].endswith(",netdev=net0")
    with pytest.raises(ValueError):
        network_argv(spec(tmp_path, NetworkConfig("tap"), {}))  # no descriptor
    # the template snapshot's device has no backend, so it restores into nat or tap
    assert network_argv(spec(tmp_path, NetworkConfig("detached"), {})) == [
        "-device",
        f"virtio-net-device,mac={guest_mac('sb-net')}",
    ]


def test_egress_policy_needs_a_confined_vmm() -> None:
    assert asyncio.run(_egress_rules(NetworkConfig(), None)) == ()
    assert asyncio.run(_egress_rules(NetworkConfig("nat", ()), None)) == ()
    with pytest.raises(NetworkError, match="root"):
        asyncio.run(_egress_rules(NetworkConfig("nat", None), None))
    with pytest.raises(NetworkError, match="ports"):
        asyncio.run(_egress_rules(NetworkConfig("nat", (), (8000,)), None))
    with pytest.raises(NetworkError, match="tap"):
        asyncio.run(_egress_rules(NetworkConfig("tap", ()), None))
    confined = Confinement(VMM_ID_BASE, VMM_ID_BASE)
    assert asyncio.run(_egress_rules(NetworkConfig("nat", None), confined)) is None
    rules = asyncio.run(_egress_rules(NetworkConfig("nat", ("1.2.3.4:80",)), confined))
    assert rules == (EgressRule(IPv4Network("1.2.3.4/32"), 80),)
