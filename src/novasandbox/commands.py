"""Commands in the guest: ``sandbox.commands`` (run, start) and the handle of a running
command. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

import asyncio
import builtins
import codecs
import collections
import inspect
import logging
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

from .agent_client import AgentClient, AgentHolder, AgentRequest, deadline_after
from .config import (
    guest_home,
    resolve_guest_path,
    validate_byte_count,
    validate_env,
    validate_timeout,
    validate_user,
)
from .errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    CommandError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    NovaSandboxError,
    ProcessNotFound,
    check_int,
)
from .guest.protocol import CHUNK_SIZE, FRAME_COST, ErrorCode, Frame, Kind
from .results import CommandResult, ProcessInfo

log = logging.getLogger("novasandbox")

OutputCallback = Callable[[str], Any]

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
"""Bytes of each of stdout and stderr that ``run`` keeps in its result (the first ones);
the rest is counted in ``CommandResult.stdout_dropped``/``stderr_dropped``."""
_AGENT_GRACE = 5.0
"""Extra seconds the host waits past a command's timeout for the agent's own report."""
_SMALL_FRAME = 16 * 1024
"""Output frames below this size are joined before their callback is called."""
_SEND_TIMEOUT = 30.0
"""Seconds a guest may take to accept input sent to a command before ``AgentTimeout``."""
_STDIN_CHUNK = 128 * 1024
"""Bytes of stdin per ``write_stdin`` message (by pid): JSON may spell each as 6."""
MAX_TAG = 256
"""Characters of a command's ``tag``."""
_START_TIMEOUT = 30.0
"""Seconds the agent has to start a command (less if the command's own deadline is
sooner)."""


def _normalize_argv(cmd: str | Sequence[str]) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise ConfigError("command must not be empty")
        return ["/bin/bash", "-l", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError("command must be a string or a non-empty sequence of strings")
    if any("\0" in a for a in argv):
        raise ConfigError("command arguments must not contain NUL bytes")
    return argv


async def _call_back(callback: Callable[[Any], Any] | None, text: str | bytes) -> None:
    if callback is None or not text:
        return
    result = callback(text)
    if inspect.isawaitable(result):
        await result


class AsyncCommandHandle:
    """A command running in the guest (from ``commands.start``).

    Its output is taken as it arrives, in the channel's reader: each stream keeps its
    first ``max_output`` bytes and counts the rest, so nothing queues up. Streams with a
    callback are handed to a task that calls it, and the guest may run at most a
    flow-control window ahead of that task. ``wait()`` returns the result. Signals go to
    the command's whole process group.
    """

    def __init__(
        self,
        sandbox: AgentHolder,
        argv: list[str],
        timeout: float | None,
        on_stdout: Callable[[Any], Any] | None,
        on_stderr: Callable[[Any], Any] | None,
        max_output: int | None = None,
        raw: bool = False,
    ) -> None:
        self._sb = sandbox
        self._raw = raw
        """Callbacks get the bytes as they came (a terminal's), not decoded text."""
        self.argv = tuple(argv)
        self.pid = 0
        self._attached = False
        """Connected to a running command (``commands.connect``) rather than its starter:
        stdin and signals then go by pid."""
        self._timeout = timeout
        self._t0 = time.monotonic()
        self._deadline = None if timeout is None else self._t0 + timeout + _AGENT_GRACE
        """When the host stops waiting for the agent to report the end (its own timeout
        plus a grace period), whatever arrives."""
        self._callbacks = {Kind.STDOUT: on_stdout, Kind.STDERR: on_stderr}
        self._buffers = {Kind.STDOUT: bytearray(), Kind.STDERR: bytearray()}
        self._dropped = {Kind.STDOUT: 0, Kind.STDERR: 0}
        self._max_output = max_output
        self._pending: collections.deque[Frame] = collections.deque()
        """Output frames waiting for their callback (at most a window's worth)."""
        self._decoders = {
            Kind.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            Kind.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._req: AgentRequest | None = None
        self._task: asyncio.Task[tuple[CommandResult, bool]] | None = None

    def _sink(self, frame: Frame) -> None:
        """Take one output frame (in the channel's reader: must not block)."""
        kind = frame.kind
        if kind not in self._buffers:
            raise AgentProtocolError(f"the guest agent sent {kind.name} data for a command")
        self._keep(kind, frame.payload)
        assert self._req is not None
        if self._callbacks[kind] is not None:
            self._pending.append(frame)
            self._req.notify()
        else:
            self._req.consumed(len(frame.payload) + FRAME_COST)

    async def _start(
        self,
        agent: AgentClient,
        fields: dict[str, Any],
        stdin: bytes | None,
        open_stdin: bool,
        op: Literal["exec", "connect"] = "exec",
    ) -> None:
        """Send the exec request (and stdin) and wait for the command to be started; or
        with ``op="connect"`` attach to the running command ``fields["pid"]``."""
        req = self._req = agent.open(self._sink)
        start_deadline = self._t0 + _START_TIMEOUT
        if self._deadline is not None:
            start_deadline = min(start_deadline, self._deadline)
        try:
            await req.send_message(op, start_deadline, **fields)
            if stdin is not None:
                for i in range(0, len(stdin), CHUNK_SIZE):
                    await req.send(Kind.STDIN, stdin[i : i + CHUNK_SIZE], start_deadline)
                if not open_stdin:
                    await req.send(Kind.STDIN, b"", start_deadline)
            started = await req.reply(start_deadline, "started", what="start the command in time")
        except BaseException:
            req.close()
            raise
        self.pid = started["pid"]
        if op == "connect":
            self._attached = True
            self.argv = tuple(started["argv"])
        self._task = asyncio.get_running_loop().create_task(self._collect(req))
        # a handle nobody waits for must not log "exception never retrieved"
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _collect(self, req: AgentRequest) -> tuple[CommandResult, bool]:
        what = f"report the end of {shlex.join(self.argv)!r} within its {self._timeout} s timeout"
        try:
            while True:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    raise AgentTimeout(f"the guest agent did not {what}")
                if req.failure is not None:  # even with output still waiting
                    raise req.failure
                if self._pending:
                    kind, data, cost = self._take_pending()
                    text = data if self._raw else self._decoders[kind].decode(data)
                    await _call_back(self._callbacks[kind], text)
                    req.consumed(cost)
                    await asyncio.sleep(0)  # a slow callback must not starve the loop
                    continue
                msg = req.take_message()
                if msg is not None:
                    if msg["op"] != "exit":
                        raise AgentProtocolError(f"unexpected {msg['op']!r} from a running command")
                    break
                await req.wait(self._deadline, what)
        except AgentTimeout:
            # The agent did not end it: make sure it does not run on (best effort).
            req.client.post("signal", target=req.id, signal=int(signal.SIGKILL))
            raise
        finally:
            self._pending.clear()
            req.close()
        for kind, decoder in self._decoders.items():
            if not self._raw:
                await _call_back(self._callbacks[kind], decoder.decode(b"", final=True))
        result = CommandResult(
            argv=self.argv,
            exit_code=msg["exit_code"],
            stdout=self._buffers[Kind.STDOUT].decode("utf-8", "replace"),
            stderr=self._buffers[Kind.STDERR].decode("utf-8", "replace"),
            stdout_dropped=self._dropped[Kind.STDOUT],
            stderr_dropped=self._dropped[Kind.STDERR],
            signal=msg["signal"],
            duration=time.monotonic() - self._t0,
            missed=msg.get("dropped") or 0,  # checked: a count, or absent (exec)
        )
        return result, msg["timed_out"]

    def _take_pending(self) -> tuple[Kind, bytes, int]:
        """The oldest waiting output, joined with the small frames of the same stream
        after it (up to a chunk): a guest that cuts its output into tiny frames does not
        get a callback call per frame."""
        first = self._pending.popleft()
        parts, size = [first.payload], len(first.payload)
        while (
            self._pending
            and self._pending[0].kind is first.kind
            and len(self._pending[0].payload) < _SMALL_FRAME
            and size + len(self._pending[0].payload) <= CHUNK_SIZE
        ):
            parts.append(self._pending.popleft().payload)
            size += len(parts[-1])
        return first.kind, b"".join(parts), size + FRAME_COST * len(parts)

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
        return self._task is not None and self._task.done()

    def disconnect(self) -> None:
        """Stop getting the command's output and exit; the command runs on (reach it by
        pid: ``commands.connect``, ``kill``...). ``wait`` then raises ``CommandError``."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait(self, *, check: bool = False) -> CommandResult:
        """Wait for the command to end. Raises ``CommandTimeout`` if it ran past its timeout
        and, with ``check``, ``CommandFailed`` if it exited non-zero."""
        assert self._task is not None
        if self._task.cancelled():
            raise CommandError(
                f"this handle of command {self.pid} was disconnected (the command runs on)"
            )
        try:
            result, timed_out = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._task.cancelled() and (current is None or not current.cancelling()):
                raise CommandError(
                    f"this handle of command {self.pid} was disconnected (the command runs on)"
                ) from None
            raise
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
        assert self._req is not None
        if self._attached:
            await AsyncCommands(self._sb).send_stdin(self.pid, data)
            return
        deadline = deadline_after(_SEND_TIMEOUT)
        blob = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(blob), CHUNK_SIZE):
            chunk = blob[i : i + CHUNK_SIZE]
            if chunk:
                await self._req.send(Kind.STDIN, chunk, deadline)

    async def close_stdin(self) -> None:
        """Signal end of input to the command."""
        assert self._req is not None
        if self._attached:
            await AsyncCommands(self._sb).close_stdin(self.pid)
            return
        await self._req.send(Kind.STDIN, b"", deadline_after(_SEND_TIMEOUT))

    async def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command's process group (no error if it already ended)."""
        if self.done() or self._req is None:
            return
        if self._attached:
            await AsyncCommands(self._sb).send_signal(self.pid, sig)
            return
        agent = self._sb._require_agent()
        try:
            await agent.call("signal", target=self._req.id, signal=int(sig))
        except NovaSandboxError as exc:
            if exc.agent_code is not ErrorCode.NO_SUCH_PROCESS:
                raise

    async def kill(self) -> None:
        """SIGKILL the command's whole process group."""
        await self.send_signal(signal.SIGKILL)


class AsyncCommands:
    """``sandbox.commands``: run processes in the guest."""

    def __init__(self, sandbox: AgentHolder) -> None:
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
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> AsyncCommandHandle:
        """Start ``cmd`` and return at once with a handle (``wait``, ``send_signal``,
        ``kill``, ``send_stdin``). ``stdin`` data is sent and then closed; with
        ``open_stdin`` stdin stays open for ``send_stdin``; otherwise it is empty.

        ``background``: through a server, the command runs on when this client's stream
        of it ends early (the process exits, the connection breaks); without it the
        server kills it then. Locally a command never depends on its handle (it runs
        until it ends, its timeout, or the sandbox's end), so it changes nothing here.

        ``user``: the account it runs as (None: the template's default user, ``user`` in
        the ``python`` template); a relative ``cwd`` is under that account's home.
        ``tag``: a label of yours that ``commands.list()`` shows."""
        return await self._launch(
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            open_stdin=open_stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output=max_output,
            background=background,
            user=user,
            tag=tag,
        )

    async def _launch(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        stdin: str | bytes | None,
        open_stdin: bool,
        on_stdout: Callable[[Any], Any] | None,
        on_stderr: Callable[[Any], Any] | None,
        max_output: int | None,
        background: bool,
        user: str | None,
        tag: str | None,
        terminal: tuple[int, int] | None = None,
    ) -> AsyncCommandHandle:
        """``start``; with ``terminal`` (cols, rows) the command gets a terminal of that
        size (its output, both streams, as bytes to ``on_stdout``)."""
        if not isinstance(background, bool):
            raise ConfigError(f"background must be True or False, got {background!r}")
        if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG):
            raise ConfigError(f"tag must be a string of at most {MAX_TAG} characters")
        argv = _normalize_argv(cmd)
        merged = {**self._sb.config.env, **validate_env(env)}
        user = validate_user(user)
        agent = self._sb._require_agent()
        if cwd is not None:
            cwd = resolve_guest_path(cwd, "cwd", guest_home(user or agent.default_user))
        timeout = validate_timeout(timeout)
        if stdin is not None and not isinstance(stdin, (str, bytes)):
            raise ConfigError("stdin must be str or bytes")
        max_output = validate_byte_count(max_output, "max_output")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        handle = AsyncCommandHandle(
            self._sb, argv, timeout, on_stdout, on_stderr, max_output, raw=terminal is not None
        )
        fields: dict[str, Any] = {
            "argv": argv,
            "env": merged,
            "cwd": cwd,
            "timeout": timeout,
            "stdin": data is not None or open_stdin,
        }
        if user is not None:
            fields["user"] = user
        if tag is not None:
            fields["tag"] = tag
        if terminal is not None:
            fields["pty"] = {"cols": terminal[0], "rows": terminal[1]}
        try:
            await handle._start(agent, fields, data, open_stdin)
        except AgentError:
            await self._sb._raise_if_crashed()  # the channel ended with the VM: say so
            raise
        log.debug("%s: started %r (guest pid %s)", self._sb.id, argv, handle.pid)
        return handle

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: Literal[False] = ...,
        user: str | None = ...,
        tag: str | None = ...,
    ) -> CommandResult: ...
    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: Literal[True],
        user: str | None = ...,
        tag: str | None = ...,
    ) -> AsyncCommandHandle: ...
    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: bool = ...,
        user: str | None = ...,
        tag: str | None = ...,
    ) -> CommandResult | AsyncCommandHandle: ...

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
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Run ``cmd`` and wait for it to finish: a string runs in bash as a login shell
        would start it (``bash -l -c``: ``/etc/profile`` and ``~/.profile`` are read), an
        argv list runs without a shell. As ``user`` (default: the template's user).

        Output is streamed to ``on_stdout``/``on_stderr`` as it arrives (decoded UTF-8) and
        collected in the result. With a ``timeout`` (seconds) the command's whole process
        group is killed when it runs over, and ``CommandTimeout`` is raised. With
        ``check`` a non-zero exit raises ``CommandFailed``.

        With ``background=True`` it returns at once with the command's handle (as
        ``start``; ``check`` applies to its ``wait``): the command runs on whether anyone
        waits for it or not, and any client reaches it by pid (``list``, ``connect``,
        ``kill``, ``send_stdin``).
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
            background=background,
            user=user,
            tag=tag,
        )
        if background:
            return handle
        return await handle.wait(check=check)

    # --- processes by pid: any client, whoever started them

    async def list(self) -> builtins.list[ProcessInfo]:
        """The commands started through the API (by any client) that still run."""
        reply = await self._sb._require_agent().call("ps")
        return [
            ProcessInfo(
                pid=p["pid"],
                cmd=tuple(p["argv"]),
                cwd=p["cwd"],
                user=p["user"],
                tag=p["tag"],
                stdin=p["stdin"],
                started_at=float(p["started_at"]),
            )
            for p in reply["processes"]
        ]

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> AsyncCommandHandle:
        """Attach to the running command ``pid`` (started through the API by any client):
        a handle that gets its output from now on, after what it printed last (up to 64
        KiB), and its exit (``wait``); ``send_stdin``, ``kill`` and the rest act on it by
        pid. Output this handle reads slower than the command writes is skipped for it
        and counted (``CommandResult.missed``); the command and its own handle are not
        slowed. ``ProcessNotFound`` if no such command runs."""
        pid = check_int("pid", pid, 1)
        max_output = validate_byte_count(max_output, "max_output")
        agent = self._sb._require_agent()
        handle = AsyncCommandHandle(self._sb, [], None, on_stdout, on_stderr, max_output)
        try:
            await handle._start(agent, {"pid": pid}, None, False, op="connect")
        except AgentError:
            await self._sb._raise_if_crashed()
            raise
        return handle

    async def send_signal(self, pid: int, sig: int) -> bool:
        """Send signal ``sig`` to the process group of the running command ``pid``;
        False if no such command runs."""
        pid = check_int("pid", pid, 1)
        sig = check_int("signal", int(sig) if isinstance(sig, signal.Signals) else sig, 1, 64)
        try:
            await self._sb._require_agent().call("signal", pid=pid, signal=sig)
        except ProcessNotFound:
            return False
        return True

    async def kill(self, pid: int) -> bool:
        """SIGKILL the process group of the running command ``pid``; whether it ran."""
        return await self.send_signal(pid, signal.SIGKILL)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Write ``data`` to the stdin of the running command ``pid`` (started with
        ``open_stdin=True``): ``ProcessNotFound``, or ``StdinClosed`` if its stdin is
        closed."""
        pid = check_int("pid", pid, 1)
        if not isinstance(data, (str, bytes, bytearray)):
            raise ConfigError("data must be str or bytes")
        blob = data.encode() if isinstance(data, str) else bytes(data)
        agent = self._sb._require_agent()
        for i in range(0, len(blob), _STDIN_CHUNK):
            chunk = blob[i : i + _STDIN_CHUNK].decode("latin-1")
            await agent.call("write_stdin", pid=pid, data=chunk, timeout=_SEND_TIMEOUT)

    async def close_stdin(self, pid: int) -> None:
        """Close the stdin of the running command ``pid`` (its reads get EOF)."""
        pid = check_int("pid", pid, 1)
        await self._sb._require_agent().call("close_stdin", pid=pid, timeout=_SEND_TIMEOUT)


__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "CommandResult",
    "OutputCallback",
    "ProcessInfo",
]
