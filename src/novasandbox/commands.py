"""Commands in the guest: ``sandbox.commands`` (run, start) and the handle of a running
command. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

import asyncio
import codecs
import inspect
import logging
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .agent_client import AgentRequest, check_reply
from .config import validate_env, validate_guest_path
from .errors import (
    AgentError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
)
from .guest.protocol import CHUNK_SIZE, Kind

if TYPE_CHECKING:
    from .sandbox import AsyncSandbox

log = logging.getLogger("novasandbox")

OutputCallback = Callable[[str], Any]

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""Bytes of each of stdout and stderr that ``run`` keeps in its result (the first ones);
the rest is counted in ``CommandResult.stdout_dropped``/``stderr_dropped``."""
_AGENT_GRACE = 10.0
"""Extra seconds the host waits past a command's timeout for the agent's own report."""


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


def _normalize_argv(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ConfigError("command must not be empty")
        return ["/bin/sh", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError("command must be a string or a non-empty sequence of strings")
    if any("\0" in a for a in argv):
        raise ConfigError("command arguments must not contain NUL bytes")
    return argv


async def _call_back(callback: OutputCallback | None, text: str) -> None:
    if callback is None or not text:
        return
    result = callback(text)
    if inspect.isawaitable(result):
        await result


class AsyncCommandHandle:
    """A command running in the guest (from ``commands.start``).

    A task collects its output as it arrives (calling the callbacks); ``wait()`` returns
    the result. Signals go to the command's whole process group.
    """

    def __init__(
        self,
        sandbox: AsyncSandbox,
        req: AgentRequest,
        argv: list[str],
        timeout: float | None,
        pid: int,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        max_output: int | None = None,
    ) -> None:
        self._sb = sandbox
        self._req = req
        self.argv = tuple(argv)
        self.pid = pid
        self._timeout = timeout
        self._t0 = time.monotonic()
        self._callbacks = {Kind.STDOUT: on_stdout, Kind.STDERR: on_stderr}
        self._buffers = {Kind.STDOUT: bytearray(), Kind.STDERR: bytearray()}
        self._dropped = {Kind.STDOUT: 0, Kind.STDERR: 0}
        self._max_output = max_output
        self._decoders = {
            Kind.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            Kind.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._task = asyncio.get_running_loop().create_task(self._collect())
        # a handle nobody waits for must not log "exception never retrieved"
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _collect(self) -> tuple[CommandResult, bool]:
        host_timeout = None if self._timeout is None else self._timeout + _AGENT_GRACE
        try:
            while True:
                remaining = (
                    None if host_timeout is None else host_timeout - (time.monotonic() - self._t0)
                )
                frame = await self._req.next_frame(
                    None if remaining is None else max(remaining, 0.01)
                )
                if frame.kind in self._buffers:
                    self._keep(frame.kind, frame.payload)
                    text = self._decoders[frame.kind].decode(frame.payload)
                    await _call_back(self._callbacks[frame.kind], text)
                    continue
                msg = check_reply(frame.message())
                if msg["op"] == "exit":
                    break
        finally:
            self._req.close()
        for kind, decoder in self._decoders.items():
            await _call_back(self._callbacks[kind], decoder.decode(b"", final=True))
        result = CommandResult(
            argv=self.argv,
            exit_code=int(msg["exit_code"]),
            stdout=self._buffers[Kind.STDOUT].decode("utf-8", "replace"),
            stderr=self._buffers[Kind.STDERR].decode("utf-8", "replace"),
            stdout_dropped=self._dropped[Kind.STDOUT],
            stderr_dropped=self._dropped[Kind.STDERR],
            signal=msg.get("signal"),
            duration=time.monotonic() - self._t0,
        )
        return result, bool(msg.get("timed_out"))

    def _keep(self, kind: Kind, data: bytes) -> None:
        """Collect output up to ``max_output`` bytes per stream (the first ones); count
        the rest, so a flood cannot grow host memory without bound."""
        buf = self._buffers[kind]
        room = len(data) if self._max_output is None else self._max_output - len(buf)
        if room >= len(data):
            buf += data
            return
        if room > 0:
            buf += data[:room]
        self._dropped[kind] += len(data) - max(room, 0)

    def done(self) -> bool:
        return self._task.done()

    async def wait(self, *, check: bool = False) -> CommandResult:
        """Wait for the command to end. Raises ``CommandTimeout`` if it ran past its timeout
        and, with ``check``, ``CommandFailed`` if it exited non-zero."""
        try:
            result, timed_out = await asyncio.shield(self._task)
        except AgentError:
            await self._sb._raise_if_crashed()
            raise
        if timed_out:
            raise CommandTimeout(
                f"command {shlex.join(self.argv)} ran past its {self._timeout} s timeout; "
                "its process group was killed",
                result,
            )
        if check and result.exit_code != 0:
            raise CommandFailed(result)
        return result

    async def send_stdin(self, data: str | bytes) -> None:
        """Feed the command's stdin (started with ``open_stdin=True``)."""
        blob = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(blob), CHUNK_SIZE):
            chunk = blob[i : i + CHUNK_SIZE]
            if chunk:
                await self._req.send(Kind.STDIN, chunk)

    async def close_stdin(self) -> None:
        """Signal end of input to the command."""
        await self._req.send(Kind.STDIN, b"")

    async def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command's process group (no error if it already ended)."""
        if self.done():
            return
        agent = self._sb._require_agent()
        try:
            await agent.call("signal", target=self._req.id, signal=int(sig))
        except AgentError as exc:
            if "no-such-process" not in str(exc):
                raise

    async def kill(self) -> None:
        """SIGKILL the command's whole process group."""
        await self.send_signal(signal.SIGKILL)


class AsyncCommands:
    """``sandbox.commands``: run processes in the guest."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        stdin: str | bytes | None = None,
        open_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> AsyncCommandHandle:
        """Start ``cmd`` and return at once with a handle (``wait``, ``send_signal``,
        ``kill``, ``send_stdin``). ``stdin`` data is sent and then closed; with
        ``open_stdin`` stdin stays open for ``send_stdin``; otherwise it is empty."""
        argv = _normalize_argv(cmd)
        merged = {**self._sb.config.env, **validate_env(env)}
        if cwd is not None:
            cwd = validate_guest_path(cwd, "cwd")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if stdin is not None and not isinstance(stdin, (str, bytes)):
            raise ConfigError("stdin must be str or bytes")
        if max_output is not None and (
            isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0
        ):
            raise ConfigError(f"max_output must be a byte count or None, got {max_output!r}")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        agent = self._sb._require_agent()
        req = agent.open()
        try:
            await req.send_message(
                "exec",
                argv=argv,
                env=merged,
                cwd=cwd,
                timeout=timeout,
                stdin=data is not None or open_stdin,
            )
            if data is not None:
                for i in range(0, len(data), CHUNK_SIZE):
                    await req.send(Kind.STDIN, data[i : i + CHUNK_SIZE])
                if not open_stdin:
                    await req.send(Kind.STDIN, b"")
            started = check_reply(await req.next_message(30.0))  # or the spawn error
        except BaseException:
            req.close()
            raise
        log.debug("%s: started %r (guest pid %s)", self._sb.id, argv, started.get("pid"))
        return AsyncCommandHandle(
            self._sb,
            req,
            argv,
            timeout,
            int(started.get("pid", 0)),
            on_stdout,
            on_stderr,
            max_output,
        )

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        stdin: str | bytes | None = None,
        check: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> CommandResult:
        """Run ``cmd`` (a shell string, or an argv list) and wait for it to finish.

        Output is streamed to ``on_stdout``/``on_stderr`` as it arrives (decoded UTF-8) and
        collected in the result. With a ``timeout`` (seconds) the command's whole process
        group is killed when it runs over, and ``CommandTimeout`` is raised. With
        ``check`` a non-zero exit raises ``CommandFailed``.
        """
        handle = await self.start(
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output=max_output,
        )
        return await handle.wait(check=check)


__all__ = ["AsyncCommandHandle", "AsyncCommands", "CommandResult", "OutputCallback"]
