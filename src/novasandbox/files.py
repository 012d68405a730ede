"""The guest's file system: ``sandbox.files``. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

import asyncio
import collections
import io
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TypeGuard, overload

from .agent_client import AgentClient, AgentHolder, AgentRequest, deadline_after, within
from .config import (
    guest_home,
    resolve_guest_path,
    validate_byte_count,
    validate_timeout,
    validate_user,
)
from .errors import (
    AgentProtocolError,
    ConfigError,
    FileTooLarge,
    SandboxFileError,
    SandboxFileNotFound,
    check_int,
)
from .guest.protocol import CHUNK_SIZE, FRAME_COST, ErrorCode, Frame, Kind


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
        """From an entry of an agent reply (already checked against ``protocol.ENTRY``)."""
        return cls(d["name"], d["path"], d["type"], d["size"], d["mode"], float(d["mtime"]))


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
        data: str | bytes | BinaryIO,
        *,
        mode: int | None = None,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> int:
        """Write ``data`` to ``path`` (parents created, file replaced); returns the size.
        ``data`` is text (UTF-8), bytes, or a binary file open for reading (``open(p,
        "rb")``), read and sent a chunk at a time from where it stands. The whole
        transfer must end within ``timeout`` seconds (None: no limit)."""
        if is_reader(data):
            return await write_stream(
                self._sb, path, read_chunks(data), mode=mode, timeout=timeout, user=user
            )
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError("data must be str, bytes or a binary file open for reading")
        view = memoryview(data)
        chunks = (bytes(view[i : i + CHUNK_SIZE]) for i in range(0, len(view), CHUNK_SIZE))
        return await write_stream(
            self._sb, path, _aiter(chunks), mode=mode, timeout=timeout, user=user
        )

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

    async def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        max_size: int | None = DEFAULT_MAX_READ,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> str | bytes:
        """Read a whole regular file, as text (UTF-8) or bytes.

        Files over ``max_size`` bytes (100 MiB by default; None: no limit), or that grow
        past it while being read, raise ``FileTooLarge``; devices, FIFOs and sockets
        raise ``NotARegularFile``; the whole read must end within ``timeout`` seconds.
        The host holds the file once (plus a chunk); text also needs the decoded copy."""
        if format not in ("text", "bytes"):
            raise ConfigError("format must be 'text' or 'bytes'")
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

    async def list(self, path: str, *, user: str | None = None) -> list[EntryInfo]:
        agent, path, who = locate(self._sb, path, user)
        reply = await agent.call("list", path=path, **who)
        return [EntryInfo.from_agent(e) for e in reply["entries"]]

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        agent, path, who = locate(self._sb, path, user)
        reply = await agent.call("stat", path=path, **who)
        return EntryInfo.from_agent(reply["stat"])

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        try:
            await self.stat(path, user=user)
        except SandboxFileNotFound:
            return False
        except SandboxFileError as exc:
            if exc.agent_code is ErrorCode.NOT_A_DIRECTORY:
                return False
            raise
        return True

    async def make_dir(self, path: str, *, user: str | None = None) -> None:
        """Create a directory and its parents (no error if it exists)."""
        agent, path, who = locate(self._sb, path, user)
        await agent.call("mkdir", path=path, parents=True, exist_ok=True, **who)

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Remove a file, or a directory with its contents."""
        agent, path, who = locate(self._sb, path, user)
        await agent.call("remove", path=path, recursive=True, **who)


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


async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


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
    timeout = validate_timeout(timeout)
    mode = validate_mode(mode)
    agent, path, who = locate(sandbox, path, user)
    deadline = deadline_after(timeout)
    req = agent.open()
    try:
        await req.send_message("write_file", deadline, path=path, mode=mode, parents=True, **who)
        pending = bytearray()
        async for chunk in chunks:
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
    return int(reply["size"])


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
    "AsyncFiles",
    "EntryInfo",
    "is_reader",
    "locate",
    "read_chunks",
    "read_stream",
    "validate_mode",
    "write_stream",
]
