"""Plain values that errors carry and the modules above them produce (no package imports),
so that ``errors`` stays the bottom of the package."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
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
    LOST = "lost"
    """Through a cluster (``serve --ray``): the node it ran on was lost; calls raise
    ``SandboxLost``."""


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


# ------------------------------------------------------------ the code interpreter's values


@dataclass(frozen=True, slots=True)
class CodeContext:
    """A code context (``create_code_context``): one interpreter process in the guest whose
    state (variables, imports, the working directory) persists between executions."""

    id: str
    language: str
    """``python`` or ``bash``."""
    cwd: str
    """The directory it started in."""
    user: str
    """The account it runs as."""
    pid: int
    """Its process (``commands.list()`` shows it, tagged ``code-context:ID:LANGUAGE``)."""


@dataclass(frozen=True, slots=True)
class Result:
    """A value the code produced, in every representation it offers (as in a notebook):
    the value of the last expression (``is_main_result``), a ``display()`` call, or a
    matplotlib figure. ``png``, ``jpeg`` and ``pdf`` are base64 text; ``json`` is the
    decoded value. A representation over the size kept is left out, and ``text`` says so."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    is_main_result: bool = False

    def formats(self) -> list[str]:
        """The representations it has (``"text"``, ``"html"``, ``"png"``, ...)."""
        names = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json")
        return [n for n in (*names, "javascript") if getattr(self, n) is not None]

    def __repr__(self) -> str:
        shown = []
        for name in self.formats():
            value = repr(getattr(self, name))
            shown.append(f"{name}={value[:60] + '...' if len(value) > 60 else value}")
        return f"Result({', '.join([*shown, f'is_main_result={self.is_main_result}'])})"


@dataclass(slots=True)
class Logs:
    """What the code printed: one entry per write (``print("x")`` is ``"x\n"``), the
    output of the processes it started included."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    dropped: int = 0
    """Entries not kept here past the bound on an execution's logs (the callbacks got
    them all)."""


@dataclass(frozen=True, slots=True)
class ExecutionError:
    """An exception the code raised (or, in bash, a non-zero exit status)."""

    name: str
    value: str
    traceback: str


@dataclass(slots=True)
class Execution:
    """What one ``run_code`` produced."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    """The context's count of executions, this one included."""

    @property
    def text(self) -> str | None:
        """The text of the main result (the value of the last expression), if any."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None


__all__ = [
    "CodeContext",
    "CommandResult",
    "Execution",
    "ExecutionError",
    "Logs",
    "ProcessInfo",
    "Result",
    "SandboxMetrics",
    "SandboxState",
]
