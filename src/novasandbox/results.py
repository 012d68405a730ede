"""Plain values that errors carry and the modules above them produce (no package imports),
so that ``errors`` stays the bottom of the package."""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


__all__ = ["CommandResult", "ProcessInfo", "SandboxState"]
