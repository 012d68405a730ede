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

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


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


__all__ = ["CommandResult", "SandboxState"]
