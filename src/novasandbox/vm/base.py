"""The VM seam: what ``AsyncSandbox`` needs from a VMM, and nothing more.

A ``Provider`` turns a ``VMSpec`` (machine config + template artifacts + the host plan +
paths in the sandbox's state directory) into a running ``VM`` whose guest agent is
reached over a byte stream (``open_channel``). The sandbox pauses, resumes, saves and
stops it through this protocol only; it never names a VMM. What a provider can do is
said by its ``Capabilities``, so the sandbox decides (once) how to start a machine on it.

Providers are registered by name in ``novasandbox.vm`` (``get_provider``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..config import MachineConfig
from ..host.plan import HostPlan
from ..host.resources import HostResources
from ..records import NETWORK_LOG
from ..snapshots import Engine


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
        return self.state_dir / "control.sock"

    @property
    def overlay(self) -> Path:
        return self.state_dir / "rootfs.qcow2"

    @property
    def network_log(self) -> Path:
        """The refusals of its egress policy, one JSON object a line (``refusals.py``)."""
        return self.state_dir / NETWORK_LOG

    @property
    def jail(self) -> Path:
        """An empty directory that a confined VMM is chrooted into."""
        return self.state_dir / "jail"


def drive_serial(index: int) -> str:
    """The serial number extra drive ``index`` (from 1) shows the guest: the agent finds
    the disk to mount by it, whatever the provider."""
    return f"nsdrive{index}"


@dataclass(frozen=True, slots=True)
class VMSpec:
    """Everything a provider needs to start one VM."""

    vm_id: str
    machine: MachineConfig
    kernel: Path | None
    """The guest kernel (None for a provider without a guest kernel)."""
    rootfs: Path | None
    """The root disk's read-only base: the template image (raw) or a snapshot's disk
    (qcow2); the VM writes to an overlay of its own (None: no disk)."""
    paths: VMPaths
    accel: str
    """How the provider runs guest code ("kvm", "tcg", or its own name)."""
    host: HostPlan
    """What the sandbox holds on the host (network, ports, VMM identity, limits)."""
    rootfs_format: str = "raw"
    incoming: Path | None = None
    """A memory snapshot to restore instead of booting (the VM starts paused)."""
    defer_incoming: bool = False
    """With ``incoming``: the VMM starts and waits; ``VM.load`` gives it the snapshot
    later (a VMM started ahead of a create, ``Capabilities.prestart``)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do; the sandbox plans with it instead of asking by name."""

    snapshots: bool
    """It saves and restores memory snapshots (fast starts, ``snapshot``, ``fork``)."""
    networks: frozenset[str]
    """The network modes it can attach ("none" always)."""
    drives: bool
    """It attaches extra disk images."""
    needs_image: bool
    """It boots the template's kernel and root file system (they must be built)."""
    isolated: bool
    """Guest code runs in a virtual machine (False: on the host, as this user)."""
    adoptable: bool = False
    """A VM it started can be taken over by another process (``Provider.adopt``)."""
    prestart: bool = False
    """It starts a VMM that waits for its snapshot (``VMSpec.defer_incoming``)."""


@runtime_checkable
class VM(Protocol):
    """A started VM, owned by the process that started it."""

    spec: VMSpec

    @property
    def pid(self) -> int:
        """The VMM's process (what the record stores and ``gc`` may kill)."""

    @property
    def start_time(self) -> int | None:
        """The VMM process's start time (clock ticks since boot), with ``pid`` its identity."""

    def is_running(self) -> bool: ...

    async def open_channel(
        self, deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh byte stream to the guest agent (it may be called again after a
        channel broke: a new agent answers on the new stream)."""

    async def wait_restored(self, deadline: float) -> None:
        """After a restore (``spec.incoming``): wait until the memory is loaded (the VM
        is then paused; ``resume`` runs it)."""

    async def load(self, memory: Path, deadline: float) -> None:
        """Start restoring ``memory`` into a VMM that was started waiting for it
        (``spec.defer_incoming``); it runs once loaded. Only with ``Capabilities.prestart``."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def save(self, memory: Path, disk: Path, timeout: float = 120.0) -> None:
        """Write the VM's memory and device state to ``memory`` and its root disk
        overlay to ``disk``; the VM ends paused. Only with ``Capabilities.snapshots``."""

    async def stop(self, timeout: float = 2.0) -> None:
        """End the VM (flushing writable drives within ``timeout``); idempotent."""

    def exit_reason(self) -> str:
        """Why the VMM ended, from its exit status and its own log (``is_running()``
        must be False)."""


@runtime_checkable
class Provider(Protocol):
    """A VMM backend, registered by name in ``novasandbox.vm``."""

    name: str
    capabilities: Capabilities

    def engine(self) -> Engine:
        """How guest code runs here and the VMM's version: a snapshot restores only
        under the same engine. Raises ``HostToolMissing`` when the VMM is not installed."""

    def accel_reason(self) -> str:
        """Why guest code runs as ``engine().accel`` says (for logs and ``doctor``)."""

    async def start(self, spec: VMSpec, held: HostResources) -> VM:
        """Start the VM described by ``spec``, using what ``held`` holds on the host
        (control group, TAP, egress guard); on failure nothing it started is left."""

    async def adopt(self, spec: VMSpec, pid: int, start_time: int) -> VM:
        """Take over the running VM that another (now dead) process started for ``spec``:
        its VMM is ``pid`` (started at ``start_time``). Only with
        ``Capabilities.adoptable``."""
