"""What a sandbox will hold on the host, decided once at create and stored in its record.

``make_plan`` is pure: from the request (network mode and allow list, exposed ports,
machine shape) and the facts gathered before it (the VMM's identity, the free loopback
ports) it decides who enforces the egress policy, what the guest's network looks like,
which host ports forward to it and the limits of its control group. Everything else
reads the plan instead of deciding again: the argv builder, the network attachment, the
record, and ``release`` (the one path that gives it all back, for kill and gc alike).
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import NetworkError
from ..network import (
    DETACHED,
    GATEWAY,
    GUEST_ADDRESS,
    GUEST_DNS,
    GUEST_NETWORK,
    NetworkConfig,
    guest_mac,
)
from .cgroups import Limits, limits_for


class Enforcement(enum.StrEnum):
    """Who decides which connections of the guest leave the host."""

    NOTHING = "nothing"
    """No network backend (no device, or a device without a backend: "detached")."""
    GUARD = "guard"
    """A seccomp guard on the VMM's connect and send calls (``netguard.py``): a "nat"
    VMM without a uid of its own (NovaSandbox not root, or privileges not dropped)."""
    NFT_UID = "nft-uid"
    """nftables rules keyed on the VMM's own uid (``egress.py``): "nat" as root."""
    NFT_TAP = "nft-tap"
    """nftables rules on the sandbox's TAP (``tap.py``, ``egress.py``): "tap" (root)."""


@dataclass(frozen=True, slots=True)
class Confinement:
    """How a VMM started as root gives up root once it has opened what it needs: it
    switches to ``uid``:``gid`` (a pair no other live sandbox uses, and no account of the
    host) and is chrooted into its sandbox's empty ``jail`` directory. From then on it
    reaches only the files it already holds open: its disks, log, console and sockets."""

    uid: int
    gid: int


VMM_ID_BASE = 0x6000_0000
"""First uid (and gid) of the range confined VMMs run as; far above any account."""
VMM_ID_COUNT = 1 << 24


def drop_privileges_wanted(env: Mapping[str, str] | None = None) -> bool:
    """``NOVASANDBOX_DROP_PRIVILEGES=0`` keeps a root VMM root (e.g. a container without
    CAP_SETUID); then it is treated as non-root users' VMMs are."""
    env = os.environ if env is None else env
    return env.get("NOVASANDBOX_DROP_PRIVILEGES", "1").strip().lower() not in ("0", "no", "false")


def confinement(
    vm_id: str, taken: Collection[int] = (), euid: int | None = None, drop: bool | None = None
) -> Confinement | None:
    """The identity a VMM started for ``vm_id`` drops to: None unless we are root (and
    privileges are to be dropped), else a uid in ``[VMM_ID_BASE, VMM_ID_BASE +
    VMM_ID_COUNT)`` derived from the id and moved on past any in ``taken`` (those of live
    sandboxes), so no two VMMs share one."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    if not (drop_privileges_wanted() if drop is None else drop):
        return None
    slot = int.from_bytes(hashlib.sha256(vm_id.encode()).digest()[:4], "big") % VMM_ID_COUNT
    used = set(taken)
    for step in range(VMM_ID_COUNT):
        uid = VMM_ID_BASE + (slot + step) % VMM_ID_COUNT
        if uid not in used:
            return Confinement(uid, uid)
    raise RuntimeError("no free VMM uid")  # 16 million live sandboxes


@dataclass(frozen=True, slots=True)
class GuestNet:
    """How the guest agent configures the guest's network device."""

    mac: str
    address: str
    prefix: int
    gateway: str
    dns: str
    """The resolver the guest uses; "" for none (no egress: lookups fail at once)."""

    def hello(self) -> dict[str, object]:
        return {
            "mac": self.mac,
            "address": self.address,
            "prefix": self.prefix,
            "gateway": self.gateway,
            "dns": self.dns,
        }


@dataclass(frozen=True, slots=True)
class HostPlan:
    """What one sandbox holds on the host (a value; stored in its record)."""

    sandbox_id: str
    network: str
    """The network mode ("none", "nat", "tap", or the internal "detached")."""
    enforcement: Enforcement
    dns: bool
    """Whether the guest gets a resolver (not with an empty allow list)."""
    guest: GuestNet | None
    """The guest's network settings; None without a network, and for "tap" until its
    TAP is leased (its address comes from the lease)."""
    host_ports: Mapping[int, int] = field(default_factory=dict)
    """Exposed guest TCP port -> port on the host's 127.0.0.1 ("nat")."""
    confine: Confinement | None = None
    """The unprivileged identity its VMM drops to (NovaSandbox running as root)."""
    limits: Limits | None = None
    """Its control group's limits, where the host has control groups."""

    @property
    def vmm_uid(self) -> int | None:
        return self.confine.uid if self.confine is not None else None

    def to_json(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "network": self.network,
            "enforcement": self.enforcement.value,
            "dns": self.dns,
            "guest": None if self.guest is None else self.guest.hello(),
            "host_ports": {str(g): h for g, h in self.host_ports.items()},
            "confine": None if self.confine is None else [self.confine.uid, self.confine.gid],
            "limits": None
            if self.limits is None
            else [
                self.limits.memory_bytes,
                self.limits.tasks,
                self.limits.cpu_quota_us,
                self.limits.cpu_period_us,
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HostPlan:
        """The plan a record holds (``ValueError``/``KeyError``/``TypeError`` if it is
        not one)."""
        guest = data["guest"]
        confine = data["confine"]
        limits = data["limits"]
        return cls(
            sandbox_id=str(data["sandbox_id"]),
            network=str(data["network"]),
            enforcement=Enforcement(data["enforcement"]),
            dns=bool(data["dns"]),
            guest=None if guest is None else GuestNet(**guest),
            host_ports={int(g): int(h) for g, h in data["host_ports"].items()},
            confine=None if confine is None else Confinement(int(confine[0]), int(confine[1])),
            limits=None if limits is None else Limits(*(int(v) for v in limits)),
        )


def make_plan(
    sandbox_id: str,
    net: NetworkConfig,
    vcpus: int,
    memory_mib: int,
    *,
    confine: Confinement | None,
    free_ports: Collection[int] = (),
    cgroups: bool = True,
) -> HostPlan:
    """Decide what the sandbox holds on the host. Pure.

    ``confine`` is its VMM's identity when NovaSandbox runs as root (``confinement``),
    ``free_ports`` the loopback ports its exposed guest ports forward from ("nat", one
    each), ``cgroups`` whether its VMM runs in a control group of its own."""
    mode = net.mode
    limits = limits_for(vcpus, memory_mib) if cgroups else None
    if not net.enabled:
        return HostPlan(
            sandbox_id, mode, Enforcement.NOTHING, False, None, confine=confine, limits=limits
        )
    dns = net.allow != () and mode != DETACHED
    mac = guest_mac(sandbox_id)
    if mode == "tap":
        if confine is None:
            raise NetworkError('network="tap" needs NovaSandbox to run as root')
        return HostPlan(
            sandbox_id, mode, Enforcement.NFT_TAP, dns, None, confine=confine, limits=limits
        )
    guest = GuestNet(
        mac,
        str(GUEST_ADDRESS),
        GUEST_NETWORK.prefixlen,
        str(GATEWAY),
        str(GUEST_DNS) if dns else "",
    )
    if mode == DETACHED:
        return HostPlan(
            sandbox_id, mode, Enforcement.NOTHING, False, guest, confine=confine, limits=limits
        )
    if len(free_ports) != len(net.ports):
        raise ValueError("one free host port per exposed guest port is needed")
    ports = dict(zip(net.ports, free_ports, strict=True))
    enforcement = Enforcement.GUARD if confine is None else Enforcement.NFT_UID
    return HostPlan(sandbox_id, mode, enforcement, dns, guest, ports, confine, limits)
