"""Terminals in the guest: ``sandbox.pty``. A terminal is a command started with a
pseudo-terminal of a given size (the agent's ``exec`` with ``pty``): what it shows comes
back as bytes, what is typed goes in as its input, and ``resize`` changes its window
(its programs get SIGWINCH). It is a command like any other: ``commands.list()`` shows
it, ``commands.connect`` and ``kill`` reach it by pid. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from .agent_client import AgentHolder
from .commands import AsyncCommands
from .errors import check_int
from .results import CommandResult

DataCallback = Callable[[bytes], Any]

DEFAULT_COLS, DEFAULT_ROWS = 80, 24
MAX_COLS, MAX_ROWS = 1000, 1000
LOGIN_SHELL = ("/bin/bash", "-l")
"""What a terminal runs when ``create`` names no command: an interactive login shell."""


def check_size(cols: int, rows: int) -> tuple[int, int]:
    """A terminal's window: 1 to 1000 columns and rows (``ConfigError`` otherwise)."""
    return check_int("cols", cols, 1, MAX_COLS), check_int("rows", rows, 1, MAX_ROWS)


class TerminalCommand(Protocol):
    """The command behind a terminal: a local ``AsyncCommandHandle`` or a remote one."""

    @property
    def pid(self) -> int: ...
    @property
    def argv(self) -> tuple[str, ...]: ...
    def done(self) -> bool: ...
    async def send_stdin(self, data: str | bytes) -> None: ...
    async def kill(self) -> None: ...
    async def wait(self, *, check: bool = False) -> CommandResult: ...
    def disconnect(self) -> None: ...


Resize = Callable[[int, int, int], Awaitable[None]]
"""How a terminal's window is set: ``resize(pid, cols, rows)`` (``AsyncTerminals.resize``
or the remote client's)."""


class AsyncTerminalHandle:
    """A terminal running in the guest (``sandbox.pty.create``), local or through a
    server: its command's handle and the way its window is resized."""

    def __init__(self, command: TerminalCommand, resize: Resize) -> None:
        self._command = command
        self._resize = resize

    @property
    def pid(self) -> int:
        """The guest pid of the terminal's command (its session leader)."""
        return self._command.pid

    @property
    def argv(self) -> tuple[str, ...]:
        """The terminal's command."""
        return self._command.argv

    def done(self) -> bool:
        return self._command.done()

    async def send_stdin(self, data: str | bytes) -> None:
        """Type ``data`` into the terminal (``"\\x03"`` is Ctrl-C, ``"\\x04"`` Ctrl-D)."""
        await self._command.send_stdin(data)

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal's window size; its foreground programs get SIGWINCH."""
        await self._resize(self.pid, cols, rows)

    async def kill(self) -> None:
        """SIGKILL the terminal's command and everything in its session's process group."""
        await self._command.kill()

    async def wait(self) -> CommandResult:
        """Wait for the terminal's command to end: its exit code (``stdout`` is empty:
        what the terminal showed went to ``on_data``)."""
        return await self._command.wait()

    def disconnect(self) -> None:
        """Stop getting its output; it runs on (``commands.connect`` by pid)."""
        self._command.disconnect()


class AsyncTerminals:
    """``sandbox.pty``: interactive terminals in the guest."""

    def __init__(self, sandbox: AgentHolder) -> None:
        self._sb = sandbox

    async def create(
        self,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        *,
        on_data: DataCallback | None = None,
        cmd: str | Sequence[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        tag: str | None = None,
    ) -> AsyncTerminalHandle:
        """Start a terminal of ``cols`` x ``rows`` running ``cmd`` (default: a login
        shell, ``bash -l``) as ``user`` (default: the template's) in ``cwd`` (default:
        its home), with ``TERM=xterm-256color`` unless ``env`` says otherwise. What it
        shows is given to ``on_data`` as bytes, as it comes (a coroutine function in the
        async API is awaited). ``timeout`` (seconds, default none) kills it when it runs
        over. It runs until its command exits (``exit`` in the shell, or ``kill``)."""
        cols, rows = check_size(cols, rows)
        command = AsyncCommands(self._sb)
        handle = await command._launch(
            list(LOGIN_SHELL) if cmd is None else cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=None,
            open_stdin=True,
            on_stdout=on_data,
            on_stderr=None,
            max_output=0,  # what it showed went to on_data; nothing is kept
            background=False,
            user=user,
            tag=tag,
            terminal=(cols, rows),
        )
        return AsyncTerminalHandle(handle, self.resize)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        """Set the window size of the terminal whose command has ``pid`` (from any
        client): ``ProcessNotFound`` if none runs, ``CommandError`` (``agent_code``
        ``not-a-terminal``) if that command has no terminal."""
        cols, rows = check_size(cols, rows)
        pid = check_int("pid", pid, 1)
        await self._sb._require_agent().call("resize", pid=pid, cols=cols, rows=rows)


__all__ = ["AsyncTerminalHandle", "AsyncTerminals", "DataCallback", "check_size"]
