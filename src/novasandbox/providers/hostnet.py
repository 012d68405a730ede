"""What a networked VM holds on the host, set up before its VMM starts and released after
it ends: its egress policy, what hears of the policy's refusals (``refusals.py``) and,
for "tap", its TAP (a lease and a descriptor)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from ipaddress import IPv4Address

from ..errors import NetworkError
from ..network import (
    DETACHED,
    GATEWAY,
    GUEST_ADDRESS,
    GUEST_DNS,
    GUEST_NETWORK,
    egress_refusal,
    guest_mac,
)
from . import egress, netguard, nflog, tap
from .base import VMSpec
from .refusals import Refusals


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


def uses_guard(spec: VMSpec) -> bool:
    """Whether a "nat" VM's egress is decided by the seccomp guard: when its VMM has no uid
    of its own to key nftables rules on (no root, or ``NOVASANDBOX_DROP_PRIVILEGES=0``).
    That includes ``allow=[]``: QEMU's own ``restrict=on`` would refuse as much, but
    silently (the guest's connections time out and nobody hears of them); the guard
    refuses them at once and says so."""
    net = spec.machine.network
    return net.mode == "nat" and spec.confine is None


class Attachment:
    """The host side of one VM's network."""

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.tap: tap.Tap | None = None
        self.tap_fd: int | None = None
        self._tap_fresh = False
        self._policy: tuple[int | str, egress.PolicyTable] | None = None
        self.guard_refuse: netguard.Refuse | None = None
        """Set when the egress policy is enforced by the seccomp guard (no root)."""
        self.guard: netguard.Guard | None = None
        self.refusals: Refusals | None = None
        """What the egress policy refused (a sandbox with a network backend)."""
        self._nflog: tuple[nflog.Listener, str | None] | None = None
        net = spec.machine.network
        mac = guest_mac(spec.vm_id)
        no_egress = net.allow == ()
        if net.mode == "tap":
            self.guest = GuestNet(mac, "", 30, "", "")
        else:
            self.guest = GuestNet(
                mac,
                str(GUEST_ADDRESS),
                GUEST_NETWORK.prefixlen,
                str(GATEWAY),
                "" if no_egress or net.mode == DETACHED else str(GUEST_DNS),
            )

    @classmethod
    def setup(cls, spec: VMSpec) -> Attachment | None:
        """Install what ``spec``'s network needs; None for no network. On failure nothing
        is left installed."""
        net = spec.machine.network
        if not net.enabled:
            return None
        att = cls(spec)
        try:
            att._setup()
        except BaseException:
            att.release()
            raise
        return att

    def _setup(self) -> None:
        spec, net = self.spec, self.spec.machine.network
        if net.mode == DETACHED:
            return
        dns = net.allow != ()
        if spec.confine is None:
            if net.mode == "tap":
                raise NetworkError('network="tap" needs NovaSandbox to run as root')
            if uses_guard(spec):
                rules = spec.egress
                resolvers = egress.host_resolvers() if dns else []

                def refuse(address: IPv4Address, port: int) -> str | None:
                    return egress_refusal(rules, address, port, resolvers)

                self.guard_refuse = refuse
                self.refusals = Refusals(spec.vm_id, spec.paths.network_log)
            return
        if net.mode == "tap":
            self.tap, self._tap_fresh = tap.acquire(spec.vm_id)
            resolvers = egress.host_resolvers()
            self.guest = GuestNet(
                self.guest.mac,
                str(self.tap.guest_address),
                30,
                str(self.tap.host_address),
                str(resolvers[0]) if dns and resolvers else "",
            )
            table = tap.table()
            egress.apply(
                spec.vm_id,
                self.tap.name,
                spec.egress,
                dns=dns,
                resolvers=resolvers,
                table=table,
                source=self.tap.guest_address,
                log_group=self._hear_refusals(table),
            )
            self._policy = (self.tap.name, table)
            self.tap_fd = tap.open_tap(self.tap)
        else:
            group = self._hear_refusals(egress.UID_TABLE)
            egress.apply(spec.vm_id, spec.confine.uid, spec.egress, dns=dns, log_group=group)
            self._policy = (spec.confine.uid, egress.UID_TABLE)

    def _hear_refusals(self, table: egress.PolicyTable) -> int | None:
        """Count what ``table``'s chain for this VM refuses and, where the kernel has
        NFLOG, hear of it: the group its refusals are logged to (None: counted only)."""
        vm_id = self.spec.vm_id
        self.refusals = Refusals(
            vm_id, self.spec.paths.network_log, lambda: egress.refused_count(vm_id, table)
        )
        loop = asyncio.get_running_loop()
        listener = nflog.hear(table.netns, vm_id, loop, self.refusals.refused)
        if listener is None:
            return None
        self._nflog = (listener, table.netns)
        return listener.group

    def host_address(self, port: int, host_ports: dict[int, int]) -> str:
        """Where the host reaches guest TCP ``port``."""
        if self.tap is not None:
            return f"{self.tap.guest_address}:{port}"
        return f"127.0.0.1:{host_ports[port]}"

    def start_guard(self, listener: int, loop: asyncio.AbstractEventLoop) -> None:
        assert self.guard_refuse is not None and self.refusals is not None
        self.guard = netguard.Guard(listener, self.guard_refuse, self.refusals.refused)
        self.guard.attach(loop)

    def close_fd(self) -> None:
        """QEMU holds its own copy of the TAP's descriptor once started."""
        if self.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tap_fd)
            self.tap_fd = None

    def release(self) -> None:
        """Remove the policy, give the TAP back, stop the guard; idempotent."""
        self.close_fd()
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self._nflog is not None:
            listener, netns = self._nflog
            nflog.stop_hearing(listener, self.spec.vm_id, netns)
            self._nflog = None
        if self.refusals is not None:
            self.refusals.close()
        if self._policy is not None:
            key, table = self._policy
            egress.remove(self.spec.vm_id, key, table)
            self._policy = None
        if self.tap is not None:
            tap.give_back(self.tap, self.spec.vm_id)
            self.tap = None
