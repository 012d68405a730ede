"""The provider interface: what sandbox logic needs from a VMM, and nothing more.

A provider turns a ``VMSpec`` (machine config + template artifacts + paths in the
sandbox's state directory) into a running VM whose guest agent listens on a
byte-stream channel the host can connect to. Sandbox logic never sees VMM details.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..config import MachineConfig
from ..network import EgressRule


@dataclass(frozen=True, slots=True)
class VMPaths:
    """Where one VM's files live (all inside the sandbox's state directory)."""

    state_dir: Path

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.state_dir / "vmm.log"

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def overlay(self) -> Path:
        return self.state_dir / "rootfs.qcow2"

    @property
    def network_log(self) -> Path:
        """The refusals of its egress policy, one JSON object a line (``refusals.py``)."""
        return self.state_dir / "network.jsonl"

    @property
    def jail(self) -> Path:
        """An empty directory that a confined VMM is chrooted into."""
        return self.state_dir / "jail"


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


def confinement(
    vm_id: str, taken: Collection[int] = (), euid: int | None = None
) -> Confinement | None:
    """The identity a VMM started for ``vm_id`` drops to: None unless we are root (and
    ``NOVASANDBOX_DROP_PRIVILEGES`` is not 0), else a
    uid in ``[VMM_ID_BASE, VMM_ID_BASE + VMM_ID_COUNT)`` derived from the id and moved on
    past any in ``taken`` (those of live sandboxes), so no two VMMs share one. Pure."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    if os.environ.get("NOVASANDBOX_DROP_PRIVILEGES", "1").strip().lower() in ("0", "no", "false"):
        return None  # e.g. a container without CAP_SETUID; what non-root users get
    slot = int.from_bytes(hashlib.sha256(vm_id.encode()).digest()[:4], "big") % VMM_ID_COUNT
    used = set(taken)
    for step in range(VMM_ID_COUNT):
        uid = VMM_ID_BASE + (slot + step) % VMM_ID_COUNT
        if uid not in used:
            return Confinement(uid, uid)
    raise RuntimeError("no free VMM uid")  # 16 million live sandboxes


@dataclass(frozen=True, slots=True)
class VMSpec:
    """Everything a provider needs to start one VM."""

    vm_id: str
    machine: MachineConfig
    kernel: Path
    rootfs: Path
    paths: VMPaths
    accel: str
    """"kvm" or "tcg"."""
    rootfs_format: str = "raw"
    """Format of ``rootfs``, the read-only backing file of the sandbox's overlay: the
    template image (raw) or a snapshot's disk (qcow2)."""
    incoming: Path | None = None
    """A memory snapshot to restore instead of booting (the VM starts paused)."""
    confine: Confinement | None = None
    """Set when the VMM is started as root: the unprivileged identity it drops to."""
    host_ports: Mapping[int, int] = field(default_factory=dict)
    """Guest TCP port -> port on the host's loopback that forwards to it (network "nat")."""
    egress: tuple[EgressRule, ...] | None = ()
    """The resolved egress allow list of a "nat" sandbox; None: the public internet; ()
    with an empty allow list: nothing."""


@runtime_checkable
class VMHandle(Protocol):
    """A started VM, owned by the process that started it."""

    @property
    def pid(self) -> int: ...

    @property
    def agent_socket(self) -> Path: ...

    def is_running(self) -> bool: ...

    async def stop(self, timeout: float = 2.0) -> None:
        """Ask the VMM to quit, then kill it if it does not; safe to call twice."""


@runtime_checkable
class Provider(Protocol):
    """A VMM backend."""

    name: str

    async def start(self, spec: VMSpec) -> VMHandle:
        """Start the VM described by ``spec``; on failure nothing is left running."""
