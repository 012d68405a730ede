"""Sandboxes: ``AsyncSandbox`` is the one implementation; ``Sandbox`` is its sync facade.

Lifecycle (an explicit state machine)::

    starting --> running --> killed
        \\            \\
         +--> error    +--> crashed   (the VMM exited on its own)

``create`` resolves the template, validates the machine config, starts the VM through
the provider, connects to the guest agent and mounts the extra drives. A failure at any
step kills the VM and removes its state directory before the error propagates.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import contextlib
import enum
import inspect
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from .agent_client import AgentClient, AgentRequest, check_reply
from .config import Drive, MachineConfig, validate_env, validate_guest_path
from .errors import (
    AgentError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    NovaSandboxError,
    SandboxFileError,
    SandboxFileNotFound,
    SandboxNotRunning,
    VMStartError,
)
from .guest.protocol import CHUNK_SIZE, Kind
from .providers.base import VMPaths, VMSpec
from .providers.qemu import QemuProvider, QemuVM, choose_accel, drive_serial
from .state import (
    SandboxInfo,
    list_sandboxes,
    new_sandbox_id,
    remove_state,
    sandboxes_dir,
    write_record,
)
from .templates import TemplateManager

log = logging.getLogger("novasandbox")

T = TypeVar("T")
OutputCallback = Callable[[str], Any]

DEFAULT_COMMAND_TIMEOUT = 60.0
DEFAULT_BOOT_TIMEOUT = 120.0
_AGENT_GRACE = 10.0
"""Extra seconds the host waits past a command's timeout for the agent's own report."""


class SandboxState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    KILLED = "killed"
    CRASHED = "crashed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command produced."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    signal: int | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A file system entry inside the sandbox."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float

    @classmethod
    def from_agent(cls, d: Mapping[str, Any]) -> EntryInfo:
        return cls(
            str(d["name"]),
            str(d["path"]),
            d["type"],
            int(d["size"]),
            int(d["mode"]),
            float(d["mtime"]),
        )


# Sandboxes of this process, killed at interpreter exit if their owner forgot.
_LIVE: dict[str, tuple[int, Path]] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE.items())
        _LIVE.clear()
    for sandbox_id, (pid, directory) in leftovers:
        log.warning("killing sandbox %s left running at exit", sandbox_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        remove_state(directory)


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
    ) -> None:
        self._sb = sandbox
        self._req = req
        self.argv = tuple(argv)
        self.pid = pid
        self._timeout = timeout
        self._t0 = time.monotonic()
        self._callbacks = {Kind.STDOUT: on_stdout, Kind.STDERR: on_stderr}
        self._buffers = {Kind.STDOUT: bytearray(), Kind.STDERR: bytearray()}
        self._decoders = {
            Kind.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            Kind.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._task = asyncio.get_running_loop().create_task(self._collect())

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
                    self._buffers[frame.kind] += frame.payload
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
            signal=msg.get("signal"),
            duration=time.monotonic() - self._t0,
        )
        return result, bool(msg.get("timed_out"))

    def done(self) -> bool:
        return self._task.done()

    async def wait(self, *, check: bool = False) -> CommandResult:
        """Wait for the command to end. Raises ``CommandTimeout`` if it ran past its timeout
        and, with ``check``, ``CommandFailed`` if it exited non-zero."""
        result, timed_out = await asyncio.shield(self._task)
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
            self._sb, req, argv, timeout, int(started.get("pid", 0)), on_stdout, on_stderr
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
        )
        return await handle.wait(check=check)


class AsyncFiles:
    """``sandbox.files``: the guest's file system."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sb = sandbox

    async def write(self, path: str, data: str | bytes, *, mode: int | None = None) -> int:
        """Write ``data`` to ``path`` (parents created, file replaced); returns the size."""
        path = validate_guest_path(path)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError("data must be str or bytes")
        agent = self._sb._require_agent()
        req = agent.open()
        try:
            await req.send_message("write_file", path=path, mode=mode, parents=True)
            view = memoryview(data)
            for i in range(0, len(view), CHUNK_SIZE):
                await req.send(Kind.DATA, bytes(view[i : i + CHUNK_SIZE]))
            await req.send_message("end")
            reply = check_reply(await req.next_message(120.0), path)
        finally:
            req.close()
        return int(reply["size"])

    @overload
    async def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...
    @overload
    async def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    async def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        """Read a whole file, as text (UTF-8) or bytes."""
        if format not in ("text", "bytes"):
            raise ConfigError("format must be 'text' or 'bytes'")
        path = validate_guest_path(path)
        agent = self._sb._require_agent()
        chunks: list[bytes] = []
        req = agent.open()
        try:
            await req.send_message("read_file", path=path)
            while True:
                frame = await req.next_frame(120.0)
                if frame.kind is Kind.DATA:
                    chunks.append(frame.payload)
                    continue
                check_reply(frame.message(), path)
                break
        finally:
            req.close()
        blob = b"".join(chunks)
        return blob if format == "bytes" else blob.decode("utf-8", "replace")

    async def list(self, path: str) -> list[EntryInfo]:
        path = validate_guest_path(path)
        reply = await self._sb._require_agent().call("list", path=path)
        return [EntryInfo.from_agent(e) for e in reply["entries"]]

    async def stat(self, path: str) -> EntryInfo:
        path = validate_guest_path(path)
        reply = await self._sb._require_agent().call("stat", path=path)
        return EntryInfo.from_agent(reply["stat"])

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except SandboxFileNotFound:
            return False
        except SandboxFileError as exc:
            if "not-a-directory" in exc.message:
                return False
            raise
        return True

    async def make_dir(self, path: str) -> None:
        """Create a directory and its parents (no error if it exists)."""
        path = validate_guest_path(path)
        await self._sb._require_agent().call("mkdir", path=path, parents=True, exist_ok=True)

    async def remove(self, path: str) -> None:
        """Remove a file, or a directory with its contents."""
        path = validate_guest_path(path)
        await self._sb._require_agent().call("remove", path=path, recursive=True)


class AsyncSandbox:
    """A running microVM sandbox (asyncio). Create with ``await AsyncSandbox.create(...)``."""

    def __init__(
        self, *, sandbox_id: str, template: str, config: MachineConfig, paths: VMPaths, accel: str
    ) -> None:
        self.id = sandbox_id
        self.template = template
        self.config = config
        self.paths = paths
        self.accel = accel
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self._state = SandboxState.STARTING
        self._vm: QemuVM | None = None
        self._agent: AgentClient | None = None
        self._started = time.monotonic()
        self._created_at = time.time()
        self._kill_lock = asyncio.Lock()

    # --- creation

    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
    ) -> AsyncSandbox:
        """Boot a sandbox from ``template`` and wait until its agent answers."""
        manager = templates or TemplateManager()
        built = manager.require_built(template)
        config = MachineConfig(
            vcpus=built.template.vcpus if vcpus is None else vcpus,
            memory_mib=built.template.memory_mib if memory_mib is None else memory_mib,
            drives=tuple(drives),
            env=env or {},
        )
        accel = choose_accel()
        sandbox_id = new_sandbox_id()
        directory = sandboxes_dir() / sandbox_id
        directory.mkdir(parents=True, mode=0o700)
        sb = cls(
            sandbox_id=sandbox_id,
            template=template,
            config=config,
            paths=VMPaths(directory),
            accel=accel.name,
        )
        log.info(
            "creating sandbox %s from %s (%s: %s)", sandbox_id, template, accel.name, accel.reason
        )
        try:
            await sb._boot(
                QemuProvider(),
                VMSpec(sandbox_id, config, built.kernel, built.rootfs, sb.paths, accel.name),
                boot_timeout,
            )
        except BaseException as exc:
            sb._state = SandboxState.ERROR
            tail = sb.console_tail()
            await sb._teardown()
            # Our own typed errors (bad config, missing tool...) pass through as they are;
            # an agent that never answered and any lower-layer failure become VMStartError.
            # Cancellation and KeyboardInterrupt are not Exceptions and pass through.
            if isinstance(exc, VMStartError) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, NovaSandboxError) and not isinstance(exc, AgentError):
                raise
            raise VMStartError(f"sandbox {sandbox_id} failed to start: {exc}", tail) from exc
        return sb

    async def _boot(self, provider: QemuProvider, spec: VMSpec, boot_timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + boot_timeout
        self._record()
        self._vm = await provider.start(spec)
        with _LIVE_LOCK:
            _LIVE[self.id] = (self._vm.pid, self.paths.state_dir)
        self._record()
        vm = self._vm
        self._agent = await AgentClient.connect(
            vm.agent_socket,
            deadline=deadline,
            alive=vm.is_running,
            hello={"time_ns": time.time_ns(), "hostname": self.id},
        )
        for index, drive in enumerate(self.config.drives, start=1):
            await self._agent.call(
                "mount",
                serial=drive_serial(index),
                path=drive.mount,
                read_only=drive.read_only,
                fstype=drive.fstype,
            )
        self._state = SandboxState.RUNNING
        self._started = time.monotonic()
        self._record()
        log.info(
            "sandbox %s ready in %.0f ms (guest kernel %s)",
            self.id,
            (time.monotonic() - t0) * 1000,
            self._agent.info.get("kernel"),
        )

    def _record(self) -> None:
        vm = self._vm
        write_record(
            self.paths.state_dir,
            SandboxInfo(
                id=self.id,
                template=self.template,
                state=self._state.value,
                pid=vm.pid if vm else None,
                pid_start_time=vm.start_time if vm else None,
                owner_pid=os.getpid(),
                created_at=self._created_at,
                vcpus=self.config.vcpus,
                memory_mib=self.config.memory_mib,
                accel=self.accel,
                state_dir=str(self.paths.state_dir),
            ),
        )

    # --- state

    @property
    def state(self) -> SandboxState:
        if (
            self._state is SandboxState.RUNNING
            and self._vm is not None
            and not self._vm.is_running()
        ):
            self._state = SandboxState.CRASHED
        return self._state

    def is_running(self) -> bool:
        return self.state is SandboxState.RUNNING

    @property
    def uptime(self) -> float:
        """Seconds since the sandbox became ready (0 before)."""
        if self._state is SandboxState.STARTING:
            return 0.0
        return time.monotonic() - self._started

    @property
    def guest_kernel(self) -> str:
        return str(self._agent.info.get("kernel", "")) if self._agent else ""

    def console_tail(self, lines: int = 40) -> str:
        """The last lines the guest printed on its serial console."""
        try:
            text = self.paths.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _require_agent(self) -> AgentClient:
        state = self.state
        if state is not SandboxState.RUNNING or self._agent is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {state.value}")
        return self._agent

    # --- teardown

    async def kill(self) -> None:
        """Stop the VM and remove everything it had on disk. Safe to call twice."""
        async with self._kill_lock:
            if self._state in (SandboxState.KILLED, SandboxState.ERROR):
                return
            await self._release_drives()
            await self._teardown()
            self._state = SandboxState.KILLED
            log.info("sandbox %s killed", self.id)

    async def _release_drives(self) -> None:
        """Unmount writable drives so that what the guest wrote is on the image file."""
        writable = [d.mount for d in self.config.drives if not d.read_only]
        if not writable or self._agent is None or not self.is_running():
            return
        try:
            reply = await self._agent.call("release", paths=writable, timeout=5.0)
            log.debug("%s: drives released: %s", self.id, reply.get("drives"))
        except NovaSandboxError as exc:
            log.warning("%s: could not release drives before kill: %s", self.id, exc)

    async def _teardown(self) -> None:
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._vm is not None:
            await self._vm.stop()
        with _LIVE_LOCK:
            _LIVE.pop(self.id, None)
        remove_state(self.paths.state_dir)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    @staticmethod
    async def list() -> list[SandboxInfo]:
        """Sandboxes recorded on this host whose VM is alive."""
        return [info for info in list_sandboxes() if info.alive]

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self.template} state={self.state.value}>"


# ---------------------------------------------------------------------------- sync facade


class _Portal:
    """Runs coroutines on one private event-loop thread shared by every sync sandbox."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="novasandbox-loop", daemon=True
                )
                thread.start()
                cls._loop, cls._thread = loop, thread
            return cls._loop

    @classmethod
    def call(cls, coro: Coroutine[Any, Any, T]) -> T:
        loop = cls.loop()
        if threading.current_thread() is cls._thread:
            coro.close()
            raise RuntimeError(
                "sync NovaSandbox calls cannot be made from inside a callback; "
                "use AsyncSandbox there"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class CommandHandle:
    """Sync twin of ``AsyncCommandHandle``."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._inner = inner

    @property
    def argv(self) -> tuple[str, ...]:
        return self._inner.argv

    @property
    def pid(self) -> int:
        return self._inner.pid

    def done(self) -> bool:
        return self._inner.done()

    def wait(self, *, check: bool = False) -> CommandResult:
        return _Portal.call(self._inner.wait(check=check))

    def send_stdin(self, data: str | bytes) -> None:
        _Portal.call(self._inner.send_stdin(data))

    def close_stdin(self) -> None:
        _Portal.call(self._inner.close_stdin())

    def send_signal(self, sig: int) -> None:
        _Portal.call(self._inner.send_signal(sig))

    def kill(self) -> None:
        _Portal.call(self._inner.kill())


class Commands:
    """Sync twin of ``AsyncCommands``; callbacks run on the library's event-loop thread."""

    def __init__(self, inner: AsyncCommands) -> None:
        self._inner = inner

    def start(
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
    ) -> CommandHandle:
        return CommandHandle(
            _Portal.call(
                self._inner.start(
                    cmd,
                    env=env,
                    cwd=cwd,
                    timeout=timeout,
                    stdin=stdin,
                    open_stdin=open_stdin,
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                )
            )
        )

    start.__doc__ = AsyncCommands.start.__doc__

    def run(
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
    ) -> CommandResult:
        return _Portal.call(
            self._inner.run(
                cmd,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                check=check,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )

    run.__doc__ = AsyncCommands.run.__doc__


class Files:
    """Sync twin of ``AsyncFiles``."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._inner = inner

    def write(self, path: str, data: str | bytes, *, mode: int | None = None) -> int:
        return _Portal.call(self._inner.write(path, data, mode=mode))

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...
    @overload
    def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        if format == "bytes":
            return _Portal.call(self._inner.read(path, format="bytes"))
        if format == "text":
            return _Portal.call(self._inner.read(path, format="text"))
        raise ConfigError("format must be 'text' or 'bytes'")

    def list(self, path: str) -> list[EntryInfo]:
        return _Portal.call(self._inner.list(path))

    def stat(self, path: str) -> EntryInfo:
        return _Portal.call(self._inner.stat(path))

    def exists(self, path: str) -> bool:
        return _Portal.call(self._inner.exists(path))

    def make_dir(self, path: str) -> None:
        return _Portal.call(self._inner.make_dir(path))

    def remove(self, path: str) -> None:
        return _Portal.call(self._inner.remove(path))


class Sandbox:
    """A running microVM sandbox (blocking API, thread-safe). Create with ``Sandbox.create``."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)

    @classmethod
    def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
    ) -> Sandbox:
        return cls(
            _Portal.call(
                AsyncSandbox.create(
                    template,
                    vcpus=vcpus,
                    memory_mib=memory_mib,
                    env=env,
                    drives=drives,
                    boot_timeout=boot_timeout,
                    templates=templates,
                )
            )
        )

    create.__func__.__doc__ = AsyncSandbox.create.__doc__  # type: ignore[attr-defined]

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def template(self) -> str:
        return self._inner.template

    @property
    def config(self) -> MachineConfig:
        return self._inner.config

    @property
    def paths(self) -> VMPaths:
        return self._inner.paths

    @property
    def accel(self) -> str:
        return self._inner.accel

    @property
    def state(self) -> SandboxState:
        return self._inner.state

    def is_running(self) -> bool:
        return self._inner.is_running()

    @property
    def uptime(self) -> float:
        return self._inner.uptime

    @property
    def guest_kernel(self) -> str:
        return self._inner.guest_kernel

    def console_tail(self, lines: int = 40) -> str:
        return self._inner.console_tail(lines)

    def kill(self) -> None:
        _Portal.call(self._inner.kill())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    @staticmethod
    def list() -> list[SandboxInfo]:
        return _Portal.call(AsyncSandbox.list())

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} template={self.template} state={self.state.value}>"


__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Files",
    "Sandbox",
    "SandboxState",
]
