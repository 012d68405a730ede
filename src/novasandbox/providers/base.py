"""The provider interface: what sandbox logic needs from a VMM, and nothing more.

A provider turns a ``VMSpec`` (machine config + template artifacts + paths in the
sandbox's state directory) into a running VM whose guest agent listens on a
byte-stream channel the host can connect to. Sandbox logic never sees VMM details.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..config import MachineConfig


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
