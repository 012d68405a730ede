"""Plain values that errors carry and the modules above them produce (no package imports),
so that ``errors`` stays the bottom of the package."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command produced."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    duration: float = 0.0
    stdout_dropped: int = 0
    """Bytes of stdout not kept because of ``max_output`` (the callback saw them all)."""
    stderr_dropped: int = 0
    missed: int = 0
    """Bytes of output a connected handle (``commands.connect``) did not get because it
    read slower than the command wrote (the command's own handle gets all of it)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A command started through the API that still runs (``commands.list()``)."""

    pid: int
    cmd: tuple[str, ...]
    """Its argv (a shell string runs as ``/bin/bash -l -c STRING``)."""
    cwd: str
    user: str
    tag: str | None
    """The tag it was started with (``tag=``), if any."""
    stdin: bool
    """Whether its stdin is open for ``send_stdin``."""
    started_at: float
    """When it started (seconds since the epoch, the guest's clock)."""


class SandboxState(enum.StrEnum):
    """The lifecycle state of a sandbox (``sandbox.py`` has the state machine); here,
    below ``sandbox``, so that the remote client has it too."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    KILLED = "killed"
    CRASHED = "crashed"
    BROKEN = "broken"
    """The VM runs but its agent channel broke (bytes that are not the protocol): calls
    raise ``AgentProtocolError`` until a new agent answers a fresh connection."""
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SandboxMetrics:
    """A sandbox's resource use, as ``sandbox.get_metrics()`` returns it. All but
    ``vmm_rss`` are what the guest's kernel says (the guest could lie: the host only
    checks that they are in range); sizes are in bytes."""

    cpu_used_pct: float
    """Share of all its vCPUs' time spent busy, 0 to 100 (100: every vCPU busy), over the
    time since the previous ``get_metrics`` when that was 0.1 to 10 s ago, else over
    0.1 s sampled now (the call waits for it)."""
    cpu_count: int
    """vCPUs the guest sees."""
    mem_used: int
    """Memory in use: MemTotal - MemAvailable of the guest's /proc/meminfo (its page cache
    does not count)."""
    mem_total: int
    """Memory the guest's kernel manages (a little under the machine's)."""
    disk_used: int
    """Used space of the guest's root file system (statvfs: all but the free blocks)."""
    disk_total: int
    """Size of the guest's root file system."""
    vmm_rss: int | None
    """The VMM process's resident memory on the host (VmRSS of /proc/PID/status: guest
    memory it touched plus the VMM's own, pages shared with other VMs counted whole);
    None where the host cannot tell."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["CommandResult", "ProcessInfo", "SandboxMetrics", "SandboxState"]
