"""The blocking API: thin twins of the async classes that run them on one private
event-loop thread. No logic lives here (a parity test keeps the signatures equal)."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, cast, overload

from .code import DEFAULT_CODE_TIMEOUT, ErrorCallback, ResultCallback
from .commands import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_OUTPUT,
    AsyncCommandHandle,
    AsyncCommands,
    CommandResult,
    OutputCallback,
    ProcessInfo,
)
from .config import Drive, MachineConfig
from .errors import ConfigError, NovaSandboxError
from .files import (
    DEFAULT_FILE_TIMEOUT,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_READ,
    AsyncFiles,
    AsyncWatchHandle,
    EntryInfo,
    FilesystemEvent,
    WatchCallback,
    WriteData,
    WriteEntry,
)
from .network import NetworkLog, NetworkMode
from .pool import AsyncPool
from .records import SandboxInfo
from .remote import (
    DEFAULT_URL_EXPIRES,
    RemoteCommandHandle,
    RemoteCommands,
    RemoteFiles,
    RemoteSandbox,
    RemoteSandboxInfo,
    RemoteSnapshot,
    RemoteTerminals,
)
from .results import CodeContext, Execution, SandboxMetrics
from .sandbox import DEFAULT_BOOT_TIMEOUT, DEFAULT_LIFETIME, AsyncSandbox, SandboxState
from .snapshots import Snapshot
from .templates import TemplateManager
from .terminal import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    AsyncTerminalHandle,
    AsyncTerminals,
    DataCallback,
)
from .vm.base import VMPaths

T = TypeVar("T")


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
    def submit(cls, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop: waited for, or only started when called from the
        loop's own thread (a generator closed by the garbage collector there)."""
        loop = cls.loop()
        if threading.current_thread() is cls._thread:
            loop.create_task(coro)
            return
        asyncio.run_coroutine_threadsafe(coro, loop).result()

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

    def __init__(self, inner: AsyncCommandHandle | RemoteCommandHandle) -> None:
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

    def disconnect(self) -> None:
        inner = self._inner

        async def in_loop() -> None:
            inner.disconnect()

        _Portal.call(in_loop())

    disconnect.__doc__ = AsyncCommandHandle.disconnect.__doc__


class TerminalHandle:
    """Sync twin of ``AsyncTerminalHandle``."""

    def __init__(self, inner: AsyncTerminalHandle) -> None:
        self._inner = inner

    @property
    def pid(self) -> int:
        return self._inner.pid

    def done(self) -> bool:
        return self._inner.done()

    def send_stdin(self, data: str | bytes) -> None:
        _Portal.call(self._inner.send_stdin(data))

    def resize(self, cols: int, rows: int) -> None:
        _Portal.call(self._inner.resize(cols, rows))

    def kill(self) -> None:
        _Portal.call(self._inner.kill())

    def wait(self) -> CommandResult:
        return _Portal.call(self._inner.wait())

    def disconnect(self) -> None:
        inner = self._inner

        async def in_loop() -> None:
            inner.disconnect()

        _Portal.call(in_loop())


class Terminals:
    """Sync twin of ``AsyncTerminals``; ``on_data`` runs on the library's loop thread."""

    def __init__(self, inner: AsyncTerminals | RemoteTerminals) -> None:
        self._inner = inner

    def create(
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
    ) -> TerminalHandle:
        creating = self._inner.create(
            cols,
            rows,
            on_data=on_data,
            cmd=cmd,
            cwd=cwd,
            env=env,
            user=user,
            timeout=timeout,
            tag=tag,
        )
        return TerminalHandle(_Portal.call(creating))

    create.__doc__ = AsyncTerminals.create.__doc__


class Commands:
    """Sync twin of ``AsyncCommands``; callbacks run on the library's event-loop thread."""

    def __init__(self, inner: AsyncCommands | RemoteCommands) -> None:
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
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> CommandHandle:
        starting = cast(  # either kind of handle: the join of the two is ``object``
            "Coroutine[Any, Any, AsyncCommandHandle | RemoteCommandHandle]",
            self._inner.start(
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
            ),
        )
        return CommandHandle(_Portal.call(starting))

    start.__doc__ = AsyncCommands.start.__doc__

    @overload
    def run(
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
    def run(
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
    ) -> CommandHandle: ...

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
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> CommandResult | CommandHandle:
        result = _Portal.call(
            self._inner.run(
                cmd,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                check=check,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                max_output=max_output,
                background=background,
                user=user,
                tag=tag,
            )
        )
        return result if isinstance(result, CommandResult) else CommandHandle(result)

    run.__doc__ = AsyncCommands.run.__doc__

    def list(self) -> builtins.list[ProcessInfo]:
        return _Portal.call(self._inner.list())

    list.__doc__ = AsyncCommands.list.__doc__

    def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> CommandHandle:
        connecting = cast(
            "Coroutine[Any, Any, AsyncCommandHandle | RemoteCommandHandle]",
            self._inner.connect(
                pid, on_stdout=on_stdout, on_stderr=on_stderr, max_output=max_output
            ),
        )
        return CommandHandle(_Portal.call(connecting))

    connect.__doc__ = AsyncCommands.connect.__doc__

    def send_signal(self, pid: int, sig: int) -> bool:
        return _Portal.call(self._inner.send_signal(pid, sig))

    send_signal.__doc__ = AsyncCommands.send_signal.__doc__

    def kill(self, pid: int) -> bool:
        return _Portal.call(self._inner.kill(pid))

    kill.__doc__ = AsyncCommands.kill.__doc__

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        _Portal.call(self._inner.send_stdin(pid, data))

    send_stdin.__doc__ = AsyncCommands.send_stdin.__doc__

    def close_stdin(self, pid: int) -> None:
        _Portal.call(self._inner.close_stdin(pid))

    close_stdin.__doc__ = AsyncCommands.close_stdin.__doc__


class Files:
    """Sync twin of ``AsyncFiles``."""

    def __init__(self, inner: AsyncFiles | RemoteFiles) -> None:
        self._inner = inner

    def write(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None = None,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> int:
        return _Portal.call(self._inner.write(path, data, mode=mode, timeout=timeout, user=user))

    write.__doc__ = AsyncFiles.write.__doc__

    def write_files(
        self,
        files: Sequence[WriteEntry | Mapping[str, Any]],
        *,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> list[EntryInfo]:
        return _Portal.call(self._inner.write_files(files, timeout=timeout, user=user))

    write_files.__doc__ = AsyncFiles.write_files.__doc__

    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> str: ...
    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> bytes: ...
    @overload
    def read(
        self,
        path: str,
        *,
        format: Literal["stream"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> Iterator[bytes]: ...

    def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes", "stream"] = "text",
        max_size: int | None = DEFAULT_MAX_READ,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> str | bytes | Iterator[bytes]:
        if format == "bytes":
            return _Portal.call(
                self._inner.read(
                    path, format="bytes", max_size=max_size, timeout=timeout, user=user
                )
            )
        if format == "text":
            return _Portal.call(
                self._inner.read(path, format="text", max_size=max_size, timeout=timeout, user=user)
            )
        if format == "stream":
            return _chunks(
                _Portal.call(
                    self._inner.read(
                        path, format="stream", max_size=max_size, timeout=timeout, user=user
                    )
                )
            )
        raise ConfigError("format must be 'text', 'bytes' or 'stream'")

    read.__doc__ = AsyncFiles.read.__doc__

    def list(
        self,
        path: str,
        *,
        depth: int = 1,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        user: str | None = None,
    ) -> list[EntryInfo]:
        return _Portal.call(self._inner.list(path, depth=depth, max_entries=max_entries, user=user))

    list.__doc__ = AsyncFiles.list.__doc__

    def get_info(self, path: str, *, user: str | None = None) -> EntryInfo:
        return _Portal.call(self._inner.get_info(path, user=user))

    get_info.__doc__ = AsyncFiles.get_info.__doc__

    def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        return _Portal.call(self._inner.stat(path, user=user))

    def exists(self, path: str, *, user: str | None = None) -> bool:
        return _Portal.call(self._inner.exists(path, user=user))

    def rename(self, old_path: str, new_path: str, *, user: str | None = None) -> EntryInfo:
        return _Portal.call(self._inner.rename(old_path, new_path, user=user))

    rename.__doc__ = AsyncFiles.rename.__doc__

    def make_dir(self, path: str, *, user: str | None = None) -> bool:
        return _Portal.call(self._inner.make_dir(path, user=user))

    make_dir.__doc__ = AsyncFiles.make_dir.__doc__

    def remove(self, path: str, *, user: str | None = None) -> None:
        return _Portal.call(self._inner.remove(path, user=user))

    def watch_dir(
        self,
        path: str,
        *,
        recursive: bool = False,
        on_event: WatchCallback | None = None,
        user: str | None = None,
    ) -> WatchHandle:
        """``AsyncFiles.watch_dir``; ``on_event`` runs on the library's event-loop thread
        (it must not call this sandbox's blocking methods)."""
        return WatchHandle(
            _Portal.call(
                self._inner.watch_dir(path, recursive=recursive, on_event=on_event, user=user)
            )
        )


class WatchHandle:
    """Sync twin of ``AsyncWatchHandle``."""

    def __init__(self, inner: AsyncWatchHandle) -> None:
        self._inner = inner

    @property
    def path(self) -> str:
        return self._inner.path

    @property
    def dropped(self) -> int:
        return self._inner.dropped

    @property
    def running(self) -> bool:
        return self._inner.running

    @property
    def error(self) -> NovaSandboxError | None:
        return self._inner.error

    def get_new_events(self) -> list[FilesystemEvent]:
        return _Portal.call(_now(self._inner.get_new_events))

    get_new_events.__doc__ = AsyncWatchHandle.get_new_events.__doc__

    def wait(self) -> None:
        _Portal.call(self._inner.wait())

    wait.__doc__ = AsyncWatchHandle.wait.__doc__

    def stop(self) -> None:
        _Portal.call(self._inner.stop())

    stop.__doc__ = AsyncWatchHandle.stop.__doc__

    def __enter__(self) -> WatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _now(fn: Callable[[], T]) -> T:
    """``fn()`` on the loop thread (what it reads is the loop's)."""
    return fn()


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _chunks(chunks: AsyncIterator[bytes]) -> Iterator[bytes]:
    """An async iterator of chunks, read from the caller's thread. Leaving the loop
    early (``close()``, or the iterator collected) closes it: the read stops."""
    try:
        while (chunk := _Portal.call(_next_chunk(chunks))) is not None:
            yield chunk
    finally:
        _Portal.submit(_close(chunks))


class Sandbox:
    """A running microVM sandbox (blocking API, thread-safe). Create with ``Sandbox.create``."""

    def __init__(self, inner: AsyncSandbox | RemoteSandbox) -> None:
        self._inner = inner
        self.commands = Commands(inner.commands)
        self.files = Files(inner.files)
        self.pty = Terminals(inner.pty)

    @classmethod
    def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str | None = None,
    ) -> Sandbox:
        return cls(
            _Portal.call(
                AsyncSandbox._open(
                    template,
                    vcpus=vcpus,
                    memory_mib=memory_mib,
                    env=env,
                    drives=drives,
                    cold=cold,
                    from_snapshot=from_snapshot,
                    timeout=timeout,
                    boot_timeout=boot_timeout,
                    templates=templates,
                    network=network,
                    allow=allow,
                    ports=ports,
                    provider=provider,
                    adoptable=adoptable,
                    labels=labels,
                    api_key=api_key,
                    server=server,
                )
            )
        )

    create.__func__.__doc__ = AsyncSandbox.create.__doc__  # type: ignore[attr-defined]

    @classmethod
    def connect(
        cls, sandbox_id: str, *, server: str | None = None, api_key: str | None = None
    ) -> Sandbox:
        return cls(_Portal.call(AsyncSandbox.connect(sandbox_id, server=server, api_key=api_key)))

    connect.__func__.__doc__ = AsyncSandbox.connect.__doc__  # type: ignore[attr-defined]

    @classmethod
    def adopt(cls, sandbox_id: str, *, timeout: float = 30.0) -> Sandbox:
        return cls(_Portal.call(AsyncSandbox.adopt(sandbox_id, timeout=timeout)))

    adopt.__func__.__doc__ = AsyncSandbox.adopt.__doc__  # type: ignore[attr-defined]

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def server(self) -> str | None:
        """The URL of the server that owns it (None: this process does)."""
        return self._inner.server

    @property
    def labels(self) -> dict[str, str]:
        return self._inner.labels

    def refresh(self) -> None:
        _Portal.call(self._inner.refresh())

    refresh.__doc__ = RemoteSandbox.refresh.__doc__

    def get_host(self, port: int) -> str:
        return self._inner.get_host(port)

    get_host.__doc__ = AsyncSandbox.get_host.__doc__

    def network_log(self) -> NetworkLog:
        return _Portal.call(self._inner.network_log())

    network_log.__doc__ = AsyncSandbox.network_log.__doc__

    def get_metrics(self) -> SandboxMetrics:
        return _Portal.call(self._inner.get_metrics())

    get_metrics.__doc__ = AsyncSandbox.get_metrics.__doc__

    @property
    def restored(self) -> bool:
        return self._inner.restored

    @property
    def provider(self) -> str:
        """The name of the provider (the VMM) that runs it (``novasandbox.vm``)."""
        return self._inner.provider

    @property
    def node(self) -> str | None:
        """Through a cluster server (``serve --ray``): the Ray node id it runs on (None
        for a sandbox of this process or of a single-host server)."""
        return self._inner.node

    @property
    def expired(self) -> bool:
        """Whether the sandbox was killed because its lifetime ended."""
        return self._inner.expired

    @property
    def cold_reason(self) -> str | None:
        return self._inner.cold_reason

    @property
    def crash_reason(self) -> str | None:
        return self._inner.crash_reason

    @property
    def timings(self) -> dict[str, float]:
        return self._inner.timings

    @property
    def source_snapshot(self) -> Snapshot | None:
        return self._inner.source_snapshot

    @property
    def deadline(self) -> float | None:
        return self._inner.deadline

    def set_timeout(self, timeout: float | None) -> None:
        _Portal.call(self._inner.set_timeout(timeout))

    def pause(self) -> None:
        _Portal.call(self._inner.pause())

    def resume(self) -> None:
        _Portal.call(self._inner.resume())

    def snapshot(self) -> Snapshot | RemoteSnapshot:
        saving = cast(  # either kind of snapshot: the join of the two is ``object``
            "Coroutine[Any, Any, Snapshot | RemoteSnapshot]", self._inner.snapshot()
        )
        return _Portal.call(saving)

    snapshot.__doc__ = AsyncSandbox.snapshot.__doc__

    def upload_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        return _Portal.call(self._inner.upload_url(path, expires))

    upload_url.__doc__ = RemoteSandbox.upload_url.__doc__

    def download_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        return _Portal.call(self._inner.download_url(path, expires))

    download_url.__doc__ = RemoteSandbox.download_url.__doc__

    def run_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
        timeout: float | None = DEFAULT_CODE_TIMEOUT,
    ) -> Execution:
        return _Portal.call(
            self._inner.run_code(
                code,
                language,
                context,
                env=env,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                on_result=on_result,
                on_error=on_error,
                timeout=timeout,
            )
        )

    run_code.__doc__ = AsyncSandbox.run_code.__doc__

    def create_code_context(
        self, cwd: str | None = None, language: str = "python", *, user: str | None = None
    ) -> CodeContext:
        return _Portal.call(self._inner.create_code_context(cwd, language, user=user))

    create_code_context.__doc__ = AsyncSandbox.create_code_context.__doc__

    def list_code_contexts(self) -> builtins.list[CodeContext]:
        return _Portal.call(self._inner.list_code_contexts())

    list_code_contexts.__doc__ = AsyncSandbox.list_code_contexts.__doc__

    def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        return _Portal.call(self._inner.restart_code_context(context))

    restart_code_context.__doc__ = AsyncSandbox.restart_code_context.__doc__

    def remove_code_context(self, context: CodeContext | str) -> None:
        _Portal.call(self._inner.remove_code_context(context))

    remove_code_context.__doc__ = AsyncSandbox.remove_code_context.__doc__

    def fork(self, n: int = 1) -> list[Sandbox]:
        forking = cast(
            "Coroutine[Any, Any, list[AsyncSandbox] | list[RemoteSandbox]]", self._inner.fork(n)
        )
        return [Sandbox(child) for child in _Portal.call(forking)]

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
    def prestart(
        template: str = "python",
        count: int = 1,
        *,
        templates: TemplateManager | None = None,
        provider: str | None = None,
    ) -> int:
        return _Portal.call(
            AsyncSandbox.prestart(template, count, templates=templates, provider=provider)
        )

    prestart.__doc__ = AsyncSandbox.prestart.__doc__

    @staticmethod
    def list(
        *,
        labels: Mapping[str, str] | None = None,
        server: str | None = None,
        api_key: str | None = None,
    ) -> list[SandboxInfo] | list[RemoteSandboxInfo]:
        return _Portal.call(AsyncSandbox.list(labels=labels, server=server, api_key=api_key))

    @staticmethod
    def list_snapshots(
        *, server: str | None = None, api_key: str | None = None
    ) -> builtins.list[Snapshot] | builtins.list[RemoteSnapshot]:
        return _Portal.call(AsyncSandbox.list_snapshots(server=server, api_key=api_key))

    list_snapshots.__doc__ = AsyncSandbox.list_snapshots.__doc__

    @staticmethod
    def delete_snapshot(
        snapshot: Snapshot | RemoteSnapshot | str,
        *,
        server: str | None = None,
        api_key: str | None = None,
    ) -> None:
        _Portal.call(AsyncSandbox.delete_snapshot(snapshot, server=server, api_key=api_key))

    delete_snapshot.__doc__ = AsyncSandbox.delete_snapshot.__doc__

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} template={self.template} state={self.state.value}>"


class Pool:
    """Sync twin of ``AsyncPool``: keeps ``size`` sandboxes ready; ``acquire()`` hands one
    over in milliseconds. Use ``with Pool(...) as pool``."""

    def __init__(
        self,
        template: str = "python",
        size: int = 2,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        parallel: int = 2,
        templates: TemplateManager | None = None,
        provider: str | None = None,
    ) -> None:
        self._inner = AsyncPool(
            template,
            size,
            env=env,
            timeout=timeout,
            parallel=parallel,
            templates=templates,
            provider=provider,
        )
        _Portal.call(self._inner.start())

    @property
    def ready(self) -> int:
        return self._inner.ready

    def start(self) -> Pool:
        """Start filling (done at construction already; kept for parity)."""
        _Portal.call(self._inner.start())
        return self

    def acquire(self, timeout: float | None = None) -> Sandbox:
        return Sandbox(_Portal.call(self._inner.acquire(timeout)))

    def close(self) -> None:
        _Portal.call(self._inner.close())

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["CommandHandle", "Commands", "Files", "Pool", "Sandbox", "WatchHandle"]
