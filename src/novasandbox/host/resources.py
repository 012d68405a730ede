"""What one sandbox holds on the host while it runs, acquired as its ``HostPlan`` says,
and ``release``: the one path that gives it back, used by ``kill`` (after the VMM
ended) and by ``gc`` (for a sandbox whose owner died) alike.

Held: its control group (where the host has them), its egress policy (nftables rules
keyed on its VMM's uid or its TAP, or the seccomp guard's decision function), what
hears of the policy's refusals (``refusals.py``) and, for "tap", its TAP (a lease and a
descriptor the VMM inherits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from ..network import EgressRule, egress_refusal, guest_mac
from . import cgroups, egress, netguard, nflog, tap
from .plan import Enforcement, GuestNet, HostPlan
from .refusals import Refusals


def free_loopback_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that are free now (the kernel picks them; the VMM binds them a
    few milliseconds later, so another process could take one in between: the VMM then
    fails to start and ``create`` says so)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def release(plan: HostPlan, tap_name: str | None) -> None:
    """Give back what ``plan``'s sandbox held outside its state directory once its VMM is
    gone: its control group, its egress policy, its TAP. From any process; idempotent."""
    sandbox_id = plan.sandbox_id
    cgroups.remove_group(sandbox_id)
    if plan.enforcement is Enforcement.NFT_UID and plan.confine is not None:
        egress.remove(sandbox_id, plan.confine.uid)
    if plan.enforcement is Enforcement.NFT_TAP and tap_name is not None:
        index = tap.tap_index(tap_name)
        if index is not None:
            egress.remove(sandbox_id, tap_name, tap.table())
            tap.give_back(tap.Tap(index), sandbox_id)


class HostResources:
    """The host side of one running sandbox (made by ``acquire``)."""

    def __init__(self, plan: HostPlan, network_log: Path) -> None:
        self.plan = plan
        self.network_log = network_log
        self.group: cgroups.VMMGroup | None = None
        """Its control group (None: rlimits only)."""
        self.tap: tap.Tap | None = None
        self.tap_fd: int | None = None
        self.guest: GuestNet | None = plan.guest
        """The guest's network settings (for "tap", from its TAP's lease)."""
        self.guard_refuse: Callable[[IPv4Address, int], str | None] | None = None
        """Set when the egress policy is enforced by the seccomp guard (no root)."""
        self.guard: netguard.Guard | None = None
        self.refusals: Refusals | None = None
        """What the egress policy refused (a sandbox with a network backend)."""
        self._nflog: tuple[nflog.Listener, str | None] | None = None
        self._released = False

    @classmethod
    def acquire(
        cls, plan: HostPlan, rules: tuple[EgressRule, ...] | None, network_log: Path
    ) -> HostResources:
        """Install what ``plan`` says (``rules``: the resolved allow list; None: the
        public internet). On failure nothing is left installed."""
        held = cls(plan, network_log)
        try:
            held._acquire(rules)
        except BaseException:
            held.release()
            raise
        return held

    @classmethod
    def adopt(cls, plan: HostPlan, tap_name: str | None, network_log: Path) -> HostResources:
        """What a sandbox adopted from a dead owner still holds (installed by that owner):
        its control group, policy and TAP are in place. Refusals are counted from the
        policy's counters; they are no longer heard entry by entry, and a seccomp guard
        died with its owner (the guest's connections then fail: closed, not open)."""
        held = cls(plan, network_log)
        if plan.limits is not None:
            layout = cgroups.detect()
            if layout is not None:
                held.group = cgroups.VMMGroup(layout, plan.sandbox_id)
        if tap_name is not None and (index := tap.tap_index(tap_name)) is not None:
            held.tap = tap.Tap(index)
            resolvers = egress.host_resolvers() if plan.dns else []
            held.guest = GuestNet(
                guest_mac(plan.sandbox_id),
                str(held.tap.guest_address),
                30,
                str(held.tap.host_address),
                str(resolvers[0]) if resolvers else "",
            )
        sandbox_id = plan.sandbox_id
        if plan.enforcement is Enforcement.NFT_UID:
            held.refusals = Refusals(
                sandbox_id, network_log, lambda: egress.refused_count(sandbox_id)
            )
        elif plan.enforcement is Enforcement.NFT_TAP:
            table = tap.table()
            held.refusals = Refusals(
                sandbox_id, network_log, lambda: egress.refused_count(sandbox_id, table)
            )
        return held

    def _acquire(self, rules: tuple[EgressRule, ...] | None) -> None:
        plan = self.plan
        if plan.limits is not None:
            layout = cgroups.detect()
            if layout is not None:
                self.group = cgroups.VMMGroup.create(layout, plan.sandbox_id, plan.limits)
        dns = plan.dns
        if plan.enforcement is Enforcement.GUARD:
            resolvers = egress.host_resolvers() if dns else []

            def refuse(address: IPv4Address, port: int) -> str | None:
                return egress_refusal(rules, address, port, resolvers)

            self.guard_refuse = refuse
            self.refusals = Refusals(plan.sandbox_id, self.network_log)
        elif plan.enforcement is Enforcement.NFT_TAP:
            self.tap, _fresh = tap.acquire(plan.sandbox_id)
            resolvers = egress.host_resolvers()
            self.guest = GuestNet(
                guest_mac(plan.sandbox_id),
                str(self.tap.guest_address),
                30,
                str(self.tap.host_address),
                str(resolvers[0]) if dns and resolvers else "",
            )
            table = tap.table()
            egress.apply(
                plan.sandbox_id,
                self.tap.name,
                rules,
                dns=dns,
                resolvers=resolvers,
                table=table,
                source=self.tap.guest_address,
                log_group=self._hear_refusals(table),
            )
            self.tap_fd = tap.open_tap(self.tap)
        elif plan.enforcement is Enforcement.NFT_UID:
            assert plan.confine is not None
            group = self._hear_refusals(egress.UID_TABLE)
            egress.apply(plan.sandbox_id, plan.confine.uid, rules, dns=dns, log_group=group)

    def _hear_refusals(self, table: egress.PolicyTable) -> int | None:
        """Count what ``table``'s chain for this sandbox refuses and, where the kernel
        has NFLOG, hear of it: the group its refusals are logged to (None: counted only)."""
        sandbox_id = self.plan.sandbox_id
        self.refusals = Refusals(
            sandbox_id, self.network_log, lambda: egress.refused_count(sandbox_id, table)
        )
        loop = asyncio.get_running_loop()
        listener = nflog.hear(table.netns, sandbox_id, loop, self.refusals.refused)
        if listener is None:
            return None
        self._nflog = (listener, table.netns)
        return listener.group

    @property
    def tap_name(self) -> str | None:
        return self.tap.name if self.tap is not None else None

    def spawn_prefix(self) -> list[str]:
        """What the VMM's argv starts with so that it starts inside its control group."""
        return self.group.spawn_prefix() if self.group is not None else []

    def host_address(self, port: int) -> str:
        """Where the host reaches guest TCP ``port``."""
        if self.tap is not None:
            return f"{self.tap.guest_address}:{port}"
        return f"127.0.0.1:{self.plan.host_ports[port]}"

    def start_guard(self, listener: int, loop: asyncio.AbstractEventLoop) -> None:
        assert self.guard_refuse is not None and self.refusals is not None
        self.guard = netguard.Guard(listener, self.guard_refuse, self.refusals.refused)
        self.guard.attach(loop)

    def close_fd(self) -> None:
        """The VMM holds its own copy of the TAP's descriptor once started."""
        if self.tap_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.tap_fd)
            self.tap_fd = None

    def oom_killed(self) -> bool:
        """Whether the kernel killed the VMM for going over its control group's memory."""
        return self.group is not None and self.group.oom_killed()

    def release(self) -> None:
        """Stop what runs in this process for the sandbox (the guard, the refusal
        listener), then ``release`` the rest; once its VMM is gone. Idempotent."""
        if self._released:
            return
        self._released = True
        self.close_fd()
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self._nflog is not None:
            listener, netns = self._nflog
            nflog.stop_hearing(listener, self.plan.sandbox_id, netns)
            self._nflog = None
        if self.refusals is not None:
            self.refusals.close()
        release(self.plan, self.tap_name)
