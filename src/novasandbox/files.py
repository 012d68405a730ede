"""The guest's file system: ``sandbox.files``. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

import asyncio
import collections
import inspect
import io
import logging
import math
import stat
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Literal, TypeAlias, TypeGuard, overload

from .agent_client import (
    AgentClient,
    AgentHolder,
    AgentRequest,
    deadline_after,
    within,
)
from .config import (
    guest_home,
    resolve_guest_path,
    validate_byte_count,
    validate_timeout,
    validate_user,
)
from .errors import (
    AgentProtocolError,
    AgentTimeout,
    ConfigError,
    FileTooLarge,
    NovaSandboxError,
    SandboxFileError,
    SandboxFileNotFound,
    TooManyEntries,
    check_int,
)
from .guest.protocol import (
    CHUNK_SIZE,
    FRAME_COST,
    MAX_LIST_DEPTH,
    MESSAGE_ACK_STEP,
    ErrorCode,
    Frame,
    Kind,
    encode_message,
)

log = logging.getLogger("novasandbox.files")

_EPOCH = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A file system entry inside the sandbox (``files.get_info``, ``files.list``).

    ``name`` is the base name, ``path`` the absolute path; ``type`` is ``file``, ``dir``,
    ``symlink`` (the link itself: links are not followed) or ``other`` (device, FIFO,
    socket). ``mode`` holds the permission bits (``0o755``) and ``permissions`` the same
    as text (``rwxr-xr-x``); ``owner`` and ``group`` are names (the numeric id, as text,
    where the guest has no name for it); ``modified_time`` is ``mtime`` (seconds since
    the epoch) as a timezone-aware UTC datetime; ``symlink_target`` is what a symlink
    points to (None for anything else)."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float
    permissions: str = "---------"
    owner: str = ""
    group: str = ""
    modified_time: datetime = _EPOCH
    symlink_target: str | None = None

    @classmethod
    def from_agent(cls, d: Mapping[str, Any]) -> EntryInfo:
        """From an entry of an agent reply (already checked against ``protocol.ENTRY``);
        ``AgentProtocolError`` for values no file has."""
        mode, mtime = d["mode"], float(d["mtime"])
        if not 0 <= mode <= 0o7777 or d["size"] < 0:
            raise AgentProtocolError(f"the guest agent sent an entry with mode {mode!r}")
        try:
            if not math.isfinite(mtime):
                raise ValueError(mtime)
            modified = datetime.fromtimestamp(mtime, UTC)
        except (ValueError, OverflowError, OSError):
            raise AgentProtocolError(
                f"the guest agent sent an entry with modification time {mtime!r}"
            ) from None
        return cls(
            d["name"],
            d["path"],
            d["type"],
            d["size"],
            mode,
            mtime,
            permissions=stat.filemode(mode)[1:],
            owner=d["owner"],
            group=d["group"],
            modified_time=modified,
            symlink_target=d.get("symlink_target"),
        )


@dataclass(frozen=True, slots=True)
class WriteEntry:
    """One file of ``files.write_files``: its path (absolute, or under the user's home),
    its data (anything ``files.write`` takes) and, optionally, its permission bits."""

    path: str
    data: WriteData
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class FilesystemEvent:
    """A change in a watched directory (``files.watch_dir``): ``name`` is the path of
    what changed, relative to the watched directory (``sub/file.txt``); ``type`` is
    ``create`` (made, or moved in), ``write``, ``remove``, ``rename`` (moved away or
    renamed: its new name comes as a ``create``) or ``chmod`` (metadata)."""

    name: str
    type: Literal["create", "write", "remove", "rename", "chmod"]


WriteData: TypeAlias = (
    "str | bytes | bytearray | memoryview | BinaryIO | Iterable[bytes] | AsyncIterable[bytes]"
)
"""What ``files.write`` takes: text (UTF-8), bytes, a binary file open for reading, or an
iterable (sync or async) of byte chunks."""
WatchCallback: TypeAlias = "Callable[[FilesystemEvent], Awaitable[None] | None]"
"""``on_event`` of ``files.watch_dir``: a function or a coroutine function."""

DEFAULT_MAX_ENTRIES = 10_000
"""Entries ``files.list`` returns at most by default (``max_entries``); more is
``TooManyEntries``."""
MAX_ENTRIES = 1_000_000
"""The largest ``max_entries`` a listing may ask for."""
MAX_KEPT_EVENTS = 10_000
"""Events a watch handle keeps for ``get_new_events``; beyond it the oldest are dropped
(and counted in ``dropped``)."""
MAX_KEPT_EVENT_BYTES = 4 << 20
"""Characters of names (plus ``FRAME_COST`` per event) a watch handle keeps for
``get_new_events``; beyond it too the oldest are dropped and counted (a name can be 16 Ki
characters, so the count alone would let a guest pin about 160 MB)."""
WATCH_STOP_WAIT = 10.0
"""Seconds ``stop()`` waits for the guest to confirm that its watch ended."""


DEFAULT_FILE_TIMEOUT = 120.0
"""Seconds a whole ``files.read`` or ``files.write`` may take (None: no limit)."""
DEFAULT_MAX_READ = 100 * 1024 * 1024
"""Bytes ``files.read`` accepts by default (``max_size=``; None: no limit)."""


def locate(
    sandbox: AgentHolder, path: str, user: str | None
) -> tuple[AgentClient, str, dict[str, Any]]:
    """For a file call: the sandbox's agent, ``path`` resolved against the home of the
    account the call runs as (``user``, or the template's default user), and the
    request's ``user`` field. The input is checked before the sandbox is asked for its
    agent, so bad input is refused the same whatever the sandbox's state."""
    user = validate_user(user)
    resolve_guest_path(path)  # its checks
    agent = sandbox._require_agent()
    home = guest_home(user or agent.default_user)
    return agent, resolve_guest_path(path, home=home), ({} if user is None else {"user": user})


class AsyncFiles:
    """``sandbox.files``: the guest's file system, as an account of the guest: every call
    takes ``user`` (None: the template's default user, ``user`` in the ``python``
    template), whose permissions apply and who owns what it creates. Paths are absolute,
    or relative to that account's home: ``"data.csv"`` is ``/home/user/data.csv``
    (``/root/data.csv`` with ``user="root"``)."""

    def __init__(self, sandbox: AgentHolder) -> None:
        self._sb = sandbox

    async def write(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None = None,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> int:
        """Write ``data`` to ``path`` (parents created, file replaced); returns the size.
        ``data`` is text (UTF-8), bytes, a binary file open for reading (``open(p,
        "rb")``, read from where it stands), or an iterable of byte chunks (a generator;
        in the async API also an async iterator): all sent a chunk at a time as they
        come, so the host never holds more than a chunk of a file or an iterator. The
        whole transfer must end within ``timeout`` seconds (None: no limit). A source
        that fails (or yields something else than bytes) after its first chunk ends the
        transfer: the file then holds what came before."""
        return (
            await _write(self._sb, path, data_chunks(data), mode=mode, timeout=timeout, user=user)
        )[0]

    async def write_files(
        self,
        files: Sequence[WriteEntry | Mapping[str, Any]],
        *,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> list[EntryInfo]:
        """Write several files in one call, in order: each a ``WriteEntry`` or a dict
        ``{"path": ..., "data": ..., "mode": ...}`` (``mode`` optional), ``data``
        anything ``write`` takes. Every entry is checked before anything is written;
        ``timeout`` is for the whole call. Returns each written file's entry (its size,
        owner, ...). A failure stops at that file: those before it stay written."""
        entries = write_entries(files)
        timeout = validate_timeout(timeout)
        deadline = deadline_after(timeout)
        infos = []
        for entry in entries:
            # one deadline for all; errors name the call's timeout, not what was left of it
            _size, info = await _write(
                self._sb,
                entry.path,
                data_chunks(entry.data),
                mode=entry.mode,
                timeout=timeout,
                deadline=deadline,
                user=user,
            )
            infos.append(info)
        return infos

    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> str: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> bytes: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["stream"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> AsyncIterator[bytes]: ...

    async def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes", "stream"] = "text",
        max_size: int | None = DEFAULT_MAX_READ,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> str | bytes | AsyncIterator[bytes]:
        """Read a regular file: as text (UTF-8), bytes, or a stream of byte chunks.

        Files over ``max_size`` bytes (100 MiB by default; None: no limit), or that grow
        past it while being read, raise ``FileTooLarge``; devices, FIFOs and sockets
        raise ``NotARegularFile``; the whole read must end within ``timeout`` seconds.
        Text and bytes: the host holds the file once (plus a chunk); text also needs the
        decoded copy. ``format="stream"`` returns an async iterator of chunks (``async
        for chunk in await files.read(p, format="stream")``; ``Sandbox``: an iterator)
        that holds at most the agent's flow-control window of the file whatever its
        size (pass ``max_size=None`` for files over 100 MiB); errors before the first
        byte (not found, permission, too large) are raised by ``read`` itself; closing
        the iterator early (``aclose()``, leaving the loop) stops the read in the
        guest."""
        if format not in ("text", "bytes", "stream"):
            raise ConfigError("format must be 'text', 'bytes' or 'stream'")
        if format == "stream":
            return await prefetched(
                read_stream(self._sb, path, max_size=max_size, timeout=timeout, user=user)
            )
        timeout = validate_timeout(timeout)
        max_size = validate_byte_count(max_size, "max_size")
        agent, path, who = locate(self._sb, path, user)
        deadline = deadline_after(timeout)
        # BytesIO grows in place and hands its buffer over without a copy (getvalue).
        blob = io.BytesIO()
        req: AgentRequest | None = None

        def sink(frame: Frame) -> None:
            if frame.kind is not Kind.DATA:
                raise AgentProtocolError(f"the guest agent sent {frame.kind.name} for a file")
            if max_size is not None and blob.tell() + len(frame.payload) > max_size:
                raise FileTooLarge(f"{path} is larger than the {max_size}-byte limit", path)
            blob.write(frame.payload)
            assert req is not None
            req.consumed(len(frame.payload) + FRAME_COST)

        req = agent.open(sink)
        try:
            await req.send_message("read_file", deadline, path=path, max_size=max_size, **who)
            reply = await req.reply(deadline, what=f"send {path}{within(timeout)}", path=path)
        finally:
            req.close()
        if reply["size"] != blob.tell():
            raise AgentProtocolError(
                f"the guest agent sent {blob.tell()} bytes of {path} but said {reply['size']}"
            )
        data = blob.getvalue()
        return data if format == "bytes" else data.decode("utf-8", "replace")

    async def list(
        self,
        path: str,
        *,
        depth: int = 1,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        user: str | None = None,
    ) -> list[EntryInfo]:
        """The entries of a directory, and with ``depth`` > 1 those of its subdirectories
        to that many levels (1 to 32; symlinks are listed, not followed), sorted by path.
        Each has its base name as ``name`` and its full path as ``path``. Subdirectories
        the account may not read are listed but not entered. More than ``max_entries``
        (10,000 by default, at most 1,000,000) raise ``TooManyEntries``: ask for less
        depth, or more entries."""
        depth = check_int("depth", depth, 1, MAX_LIST_DEPTH)
        max_entries = check_int("max_entries", max_entries, 1, MAX_ENTRIES)
        agent, path, who = locate(self._sb, path, user)
        deadline = deadline_after(DEFAULT_FILE_TIMEOUT)
        entries: list[EntryInfo] = []
        req = agent.open()
        acks = _Acks(req)
        try:
            await req.send_message(
                "list", deadline, path=path, depth=depth, max_entries=max_entries, **who
            )
            what = f"list {path}{within(DEFAULT_FILE_TIMEOUT)}"
            while (msg := await req.reply(deadline, what=what, path=path))["op"] == "entries":
                if len(entries) + len(msg["entries"]) > max_entries:
                    raise AgentProtocolError(f"the guest agent sent over {max_entries} entries")
                entries.extend(EntryInfo.from_agent(e) for e in msg["entries"])
                acks.consumed()
        finally:
            req.close()
        if msg["truncated"]:
            raise TooManyEntries(
                f"{path} holds more than {max_entries} entries at depth {depth} "
                "(raise max_entries, or list less deep)",
                path,
            )
        entries.sort(key=lambda e: e.path.split("/"))
        return entries

    async def get_info(self, path: str, *, user: str | None = None) -> EntryInfo:
        """The entry at ``path`` (a symlink's own, not its target's)."""
        agent, path, who = locate(self._sb, path, user)
        reply = await agent.call("stat", path=path, **who)
        return EntryInfo.from_agent(reply["stat"])

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        """``get_info`` (its former name)."""
        return await self.get_info(path, user=user)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.get_info(path, user=user)
        except SandboxFileNotFound:
            return False
        except SandboxFileError as exc:
            if exc.agent_code is ErrorCode.NOT_A_DIRECTORY:
                return False
            raise
        return True

    async def rename(self, old_path: str, new_path: str, *, user: str | None = None) -> EntryInfo:
        """Rename (move) a file or directory within the guest; returns its new entry.
        Nothing is replaced: an existing ``new_path`` raises ``SandboxFileExists``; a
        missing ``old_path`` (or parent of ``new_path``) ``SandboxFileNotFound``."""
        agent, old_path, who = locate(self._sb, old_path, user)
        new_path = locate(self._sb, new_path, user)[1]
        reply = await agent.call("rename", path=old_path, to=new_path, **who)
        return EntryInfo.from_agent(reply["stat"])

    async def make_dir(self, path: str, *, user: str | None = None) -> bool:
        """Create a directory and its parents: True if it created it, False if it was
        there already. A file (or anything but a directory) in the way, at the path or
        above it, raises ``NotADirectory``."""
        agent, path, who = locate(self._sb, path, user)
        reply = await agent.call("mkdir", path=path, parents=True, exist_ok=True, **who)
        return bool(reply["created"])

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Remove a file, or a directory with its contents."""
        agent, path, who = locate(self._sb, path, user)
        await agent.call("remove", path=path, recursive=True, **who)

    async def watch_dir(
        self,
        path: str,
        *,
        recursive: bool = False,
        on_event: WatchCallback | None = None,
        user: str | None = None,
    ) -> AsyncWatchHandle:
        """Watch a directory for changes (inotify in the guest), from now until
        ``stop()`` or the sandbox's end; with ``recursive`` its subdirectories too,
        those made later included (up to 8192 directories). Returns once the watch is
        in place: a handle whose ``get_new_events()`` returns the ``FilesystemEvent``s
        that came since it was last called; ``on_event`` (a function or a coroutine
        function) is also called with each as it comes. Events are bounded: when the
        caller does not keep up (10,000 events, or 4 MiB of names, wait unread), the
        oldest are dropped and counted in ``dropped``.
        The directory must exist and be readable by the account."""
        if not isinstance(recursive, bool):
            raise ConfigError(f"recursive must be True or False, got {recursive!r}")
        if on_event is not None and not callable(on_event):
            raise ConfigError("on_event must be a function or None")
        agent, path, who = locate(self._sb, path, user)
        deadline = deadline_after(30.0)
        req = agent.open()
        try:
            await req.send_message("watch_dir", deadline, path=path, recursive=recursive, **who)
            await req.reply(deadline, "watching", what=f"watch {path} within 30 s", path=path)
        except BaseException:
            req.close()
            raise
        handle = AsyncWatchHandle(path, on_event)
        handle._attach(_pump_local(handle, req), lambda: _cancel(req))
        return handle


def _cancel(req: AgentRequest) -> None:
    if not req.finished and req.failure is None:
        req.client.send_nowait(encode_message(req.id, "cancel"))


class _Acks:
    """The host's side of the flow control of streamed messages (``MESSAGE_WINDOW``):
    acknowledge them in steps as they are used."""

    def __init__(self, req: AgentRequest) -> None:
        self._req = req
        self._used = 0

    def consumed(self) -> None:
        self._used += 1
        req = self._req
        if self._used >= MESSAGE_ACK_STEP and not req.finished and req.failure is None:
            req.client.send_nowait(encode_message(req.id, "ack", bytes=self._used))
            self._used = 0


async def _pump_local(handle: AsyncWatchHandle, req: AgentRequest) -> None:
    acks = _Acks(req)
    try:
        while True:
            msg = await req.reply(None, what="watch", path=handle.path)
            if msg["op"] == "ok":
                handle._ended(msg["dropped"])
                return
            await handle._arrived(
                [FilesystemEvent(e["name"], e["type"]) for e in msg["events"]], msg["dropped"]
            )
            acks.consumed()
    finally:
        req.close()


class AsyncWatchHandle:
    """A directory watched in the guest (``files.watch_dir``): ``get_new_events()``,
    ``stop()``. The watch ends with ``stop()``, when the directory is removed or moved,
    or with the sandbox; ``running`` says whether it still runs, ``error`` why it ended
    if not by ``stop()`` or the directory's going."""

    def __init__(self, path: str, on_event: WatchCallback | None) -> None:
        self.path = path
        """The watched directory (absolute)."""
        self._on_event = on_event
        self._events: collections.deque[FilesystemEvent] = collections.deque()
        self._kept_bytes = 0
        """What ``_events`` holds, as ``_event_cost`` counts it."""
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._cancel: Callable[[], None] | None = None
        self.error: NovaSandboxError | None = None

    def _attach(self, pump: Awaitable[None], cancel: Callable[[], None] | None) -> None:
        async def run() -> None:
            try:
                await pump
            except NovaSandboxError as exc:
                self.error = exc

        self._task = asyncio.get_running_loop().create_task(run())
        _WATCHING.add(self._task)
        self._task.add_done_callback(_WATCHING.discard)
        self._cancel = cancel

    async def _arrived(self, events: list[FilesystemEvent], dropped: int) -> None:
        """Events from the guest: kept (bounded) and handed to ``on_event``."""
        self._dropped += max(0, dropped)
        for event in events:
            cost = _event_cost(event)
            while self._events and (
                len(self._events) >= MAX_KEPT_EVENTS
                or self._kept_bytes + cost > MAX_KEPT_EVENT_BYTES
            ):
                self._kept_bytes -= _event_cost(self._events.popleft())
                self._dropped += 1
            self._events.append(event)
            self._kept_bytes += cost
            if self._on_event is not None:
                try:
                    result = self._on_event(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("on_event of the watch of %s failed", self.path)

    def _ended(self, dropped: int) -> None:
        self._dropped += max(0, dropped)

    def get_new_events(self) -> list[FilesystemEvent]:
        """The events that came since the last call (oldest first)."""
        out = []
        while self._events:
            out.append(self._events.popleft())
        self._kept_bytes = 0
        return out

    @property
    def dropped(self) -> int:
        """Events lost so far: the guest's queue or this handle's overflowed."""
        return self._dropped

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait(self) -> None:
        """Wait until the watch ends (``stop()``, the directory removed or moved away,
        the sandbox gone: ``error`` says which)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def stop(self) -> None:
        """End the watch in the guest (its inotify descriptor is closed) and wait for it
        to confirm (up to 10 s). Events that came before stay in ``get_new_events()``.
        Idempotent."""
        task = self._task
        if task is None or task.done():
            return
        if self._cancel is not None:
            self._cancel()
            done, _ = await asyncio.wait({task}, timeout=WATCH_STOP_WAIT)
            if done:
                return
        task.cancel()
        await asyncio.wait({task})


def _event_cost(event: FilesystemEvent) -> int:
    """What a kept event counts for against ``MAX_KEPT_EVENT_BYTES``."""
    return len(event.name) + FRAME_COST


_WATCHING: set[asyncio.Task[None]] = set()
"""The tasks of running watches (the event loop keeps only weak references)."""


def write_entries(files: Sequence[WriteEntry | Mapping[str, Any]]) -> list[WriteEntry]:
    """``write_files``'s entries, checked (paths, data kinds, modes), as ``WriteEntry``."""
    if isinstance(files, (str, bytes, Mapping)) or not isinstance(files, Sequence):
        raise ConfigError("files must be a list of WriteEntry or {'path', 'data'} dicts")
    out = []
    for i, item in enumerate(files):
        if isinstance(item, Mapping):
            unknown = set(item) - {"path", "data", "mode"}
            if unknown or "path" not in item or "data" not in item:
                raise ConfigError(
                    f"files[{i}] must have 'path' and 'data' (and optionally 'mode'), "
                    f"got the keys {sorted(map(str, item))}"
                )
            item = WriteEntry(item["path"], item["data"], item.get("mode"))
        if not isinstance(item, WriteEntry):
            raise ConfigError(f"files[{i}] must be a WriteEntry or a dict, got {item!r:.80}")
        resolve_guest_path(item.path, f"files[{i}].path")
        validate_mode(item.mode)
        check_data(item.data)
        out.append(item)
    return out


async def prefetched(chunks: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """``chunks`` with its first chunk taken now, so that an error before any byte is
    raised here, by the call, rather than by the loop that reads it."""
    try:
        first = await anext(chunks, b"")
    except BaseException:
        await chunks.aclose()
        raise

    async def rest() -> AsyncGenerator[bytes, None]:
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    return rest()


def validate_mode(mode: int | None) -> int | None:
    """A file's permission bits (``0o755``): 0 to 0o7777, or None (the default)."""
    return None if mode is None else check_int("mode", mode, 0, 0o7777)


def is_reader(data: object) -> TypeGuard[BinaryIO]:
    """Whether ``data`` is a binary file to read from; ``ConfigError`` for a file open in
    text mode (refused before anything is sent)."""
    if isinstance(data, io.TextIOBase):
        raise ConfigError("data must be a file open in binary mode ('rb'), not text mode")
    return not isinstance(data, (str, bytes, bytearray, memoryview)) and callable(
        getattr(data, "read", None)
    )


async def read_chunks(reader: BinaryIO) -> AsyncIterator[bytes]:
    """What a binary file holds from where it stands, a chunk at a time (read in a
    thread: a file may be slow)."""
    while True:
        chunk = await asyncio.to_thread(reader.read, CHUNK_SIZE)
        if not isinstance(chunk, (bytes, bytearray)):
            raise ConfigError("data must be a file open in binary mode ('rb')")
        if not chunk:
            return
        yield bytes(chunk)


def check_data(data: object) -> None:
    """``ConfigError`` unless ``data`` is something ``files.write`` takes."""
    if isinstance(data, (str, bytes, bytearray, memoryview)) or is_reader(data):
        return
    if isinstance(data, Mapping) or not isinstance(data, (Iterable, AsyncIterable)):
        raise ConfigError(
            "data must be str, bytes, a binary file open for reading, or an iterable of bytes"
        )


def data_chunks(data: WriteData) -> AsyncIterator[bytes]:
    """What ``files.write`` sends for ``data`` (see there), chunk by chunk. A sync
    iterator other than a list or tuple is advanced in a thread (it may read a file);
    each chunk must be bytes (``ConfigError`` otherwise)."""
    check_data(data)
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        # a chunk copied at a time, as it is sent: never a second copy of the whole data
        return _aiter(bytes(view[i : i + CHUNK_SIZE]) for i in range(0, len(view), CHUNK_SIZE))
    if is_reader(data):
        return read_chunks(data)
    if isinstance(data, AsyncIterable):
        return _checked(data)
    assert isinstance(data, Iterable)
    if isinstance(data, (list, tuple)):
        return _checked(_aiter(data))
    return _checked(_threaded(iter(data)))


async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _threaded(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield chunk  # type: ignore[misc]


async def _checked(chunks: AsyncIterable[object]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise ConfigError(f"the chunks of data must be bytes, got {type(chunk).__name__}")
        if chunk:
            yield bytes(chunk)


async def write_stream(
    sandbox: AgentHolder,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    mode: int | None = None,
    timeout: float | None = DEFAULT_FILE_TIMEOUT,
    user: str | None = None,
) -> int:
    """Write what ``chunks`` yields to ``path`` as it comes (parents created, file
    replaced), holding at most a chunk of it; returns the size. ``files.write`` with data
    that arrives over time (an HTTP upload). An error the source raises ends the transfer
    and propagates; the file then holds what was written so far."""
    return (await _write(sandbox, path, chunks, mode=mode, timeout=timeout, user=user))[0]


async def write_stream_info(
    sandbox: AgentHolder,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    mode: int | None = None,
    timeout: float | None = DEFAULT_FILE_TIMEOUT,
    user: str | None = None,
) -> EntryInfo:
    """``write_stream``, returning the written file's entry (``files.write_files``)."""
    return (await _write(sandbox, path, chunks, mode=mode, timeout=timeout, user=user))[1]


async def _write(
    sandbox: AgentHolder,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    mode: int | None,
    timeout: float | None,
    user: str | None,
    deadline: float | None = None,
) -> tuple[int, EntryInfo]:
    """Write ``chunks`` to ``path`` by ``deadline`` (default: ``timeout`` from now);
    ``timeout`` is what timeout errors name (``write_files``: the whole call's)."""
    timeout = validate_timeout(timeout)
    mode = validate_mode(mode)
    agent, path, who = locate(sandbox, path, user)
    if deadline is None:
        deadline = deadline_after(timeout)
    elif time.monotonic() >= deadline:
        raise AgentTimeout(f"the guest agent did not write {path}{within(timeout)}")
    source = aiter(chunks)
    # the first chunk before the file is opened: a source that fails at once changes nothing
    first = await anext(source, b"")
    req = agent.open()
    try:
        await req.send_message("write_file", deadline, path=path, mode=mode, parents=True, **who)
        pending = bytearray(first)
        async for chunk in source:
            pending += chunk
            while len(pending) >= CHUNK_SIZE:
                await req.send(Kind.DATA, bytes(pending[:CHUNK_SIZE]), deadline)
                del pending[:CHUNK_SIZE]
                if (msg := req.take_message(path=path)) is not None:  # an early error
                    raise AgentProtocolError(f"unexpected {msg['op']!r} during an upload")
        if pending:
            await req.send(Kind.DATA, bytes(pending), deadline)
        await req.send_message("end", deadline)
        reply = await req.reply(deadline, what=f"write {path}{within(timeout)}", path=path)
    finally:
        req.close()
    size = int(reply["size"])
    if reply.get("stat") is None:  # the agent could not stat what it wrote: ask again
        return size, EntryInfo.from_agent((await agent.call("stat", path=path, **who))["stat"])
    return size, EntryInfo.from_agent(reply["stat"])


async def read_stream(
    sandbox: AgentHolder,
    path: str,
    *,
    max_size: int | None = DEFAULT_MAX_READ,
    timeout: float | None = DEFAULT_FILE_TIMEOUT,
    user: str | None = None,
) -> AsyncGenerator[bytes, None]:
    """The bytes of a regular file as they come from the guest, in chunks; the guest
    runs at most a flow-control window ahead of the consumer, so the host holds no more
    than that of the file whatever its size. ``files.read`` for a consumer that passes
    the data on (an HTTP download). Errors are ``files.read``'s; one raised before the
    first chunk means nothing was sent. Closing the iterator early (``aclose``) cancels
    the read in the guest."""
    timeout = validate_timeout(timeout)
    max_size = validate_byte_count(max_size, "max_size")
    agent, path, who = locate(sandbox, path, user)
    deadline = deadline_after(timeout)
    waiting: collections.deque[bytes] = collections.deque()
    received = 0
    req: AgentRequest | None = None

    def sink(frame: Frame) -> None:
        nonlocal received
        if frame.kind is not Kind.DATA:
            raise AgentProtocolError(f"the guest agent sent {frame.kind.name} for a file")
        received += len(frame.payload)
        if max_size is not None and received > max_size:
            raise FileTooLarge(f"{path} is larger than the {max_size}-byte limit", path)
        waiting.append(frame.payload)
        assert req is not None
        req.notify()

    req = agent.open(sink)
    try:
        await req.send_message("read_file", deadline, path=path, max_size=max_size, **who)
        what = f"send {path}{within(timeout)}"
        while True:
            if waiting:
                chunk = waiting.popleft()
                yield chunk
                req.consumed(len(chunk) + FRAME_COST)
                continue
            reply = req.take_message(path=path)
            if reply is not None:
                break
            await req.wait(deadline, what)
    finally:
        req.close()
    if reply["size"] != received:
        raise AgentProtocolError(
            f"the guest agent sent {received} bytes of {path} but said {reply['size']}"
        )


__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "MAX_ENTRIES",
    "AsyncFiles",
    "AsyncWatchHandle",
    "EntryInfo",
    "FilesystemEvent",
    "WatchCallback",
    "WriteData",
    "WriteEntry",
    "check_data",
    "data_chunks",
    "is_reader",
    "locate",
    "prefetched",
    "read_chunks",
    "read_stream",
    "validate_mode",
    "write_entries",
    "write_stream",
    "write_stream_info",
]
