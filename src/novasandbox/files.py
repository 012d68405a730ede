"""The guest's file system: ``sandbox.files``. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

import asyncio
import collections
import io
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TypeGuard, overload

from .agent_client import AgentHolder, AgentRequest, deadline_after, within
from .config import resolve_guest_path, validate_byte_count, validate_timeout
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


class AsyncFiles:
    """``sandbox.files``: the guest's file system. Paths are absolute, or relative to the
    home directory commands run in (``GUEST_HOME``, ``/root``): ``"data.csv"`` is
    ``/root/data.csv``."""

    def __init__(self, sandbox: AgentHolder) -> None:
        self._sb = sandbox

    async def write(
        self,
        path: str,
        data: str | bytes | BinaryIO,
        *,
        mode: int | None = None,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
    ) -> int:
        """Write ``data`` to ``path`` (parents created, file replaced); returns the size.
        ``data`` is text (UTF-8), bytes, or a binary file open for reading (``open(p,
        "rb")``), read and sent a chunk at a time from where it stands. The whole
        transfer must end within ``timeout`` seconds (None: no limit)."""
        if is_reader(data):
            return await write_stream(self._sb, path, read_chunks(data), mode=mode, timeout=timeout)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError("data must be str, bytes or a binary file open for reading")
        view = memoryview(data)
        chunks = (bytes(view[i : i + CHUNK_SIZE]) for i in range(0, len(view), CHUNK_SIZE))
        return await write_stream(self._sb, path, _aiter(chunks), mode=mode, timeout=timeout)

    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        max_size: int | None = ...,
        timeout: float | None = ...,
    ) -> str: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        max_size: int | None = ...,
        timeout: float | None = ...,
    ) -> bytes: ...

    async def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes"] = "text",
        max_size: int | None = DEFAULT_MAX_READ,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
    ) -> str | bytes:
        """Read a whole regular file, as text (UTF-8) or bytes.

        Files over ``max_size`` bytes (100 MiB by default; None: no limit), or that grow
        past it while being read, raise ``FileTooLarge``; devices, FIFOs and sockets
        raise ``NotARegularFile``; the whole read must end within ``timeout`` seconds.
        The host holds the file once (plus a chunk); text also needs the decoded copy."""
        if format not in ("text", "bytes"):
            raise ConfigError("format must be 'text' or 'bytes'")
        path = resolve_guest_path(path)
        timeout = validate_timeout(timeout)
        max_size = validate_byte_count(max_size, "max_size")
        deadline = deadline_after(timeout)
        agent = self._sb._require_agent()
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
            await req.send_message("read_file", deadline, path=path, max_size=max_size)
            reply = await req.reply(deadline, what=f"send {path}{within(timeout)}", path=path)
        finally:
            req.close()
        if reply["size"] != blob.tell():
            raise AgentProtocolError(
                f"the guest agent sent {blob.tell()} bytes of {path} but said {reply['size']}"
            )
        data = blob.getvalue()
        return data if format == "bytes" else data.decode("utf-8", "replace")

    async def list(self, path: str) -> list[EntryInfo]:
        path = resolve_guest_path(path)
        reply = await self._sb._require_agent().call("list", path=path)
        return [EntryInfo.from_agent(e) for e in reply["entries"]]

    async def stat(self, path: str) -> EntryInfo:
        path = resolve_guest_path(path)
        reply = await self._sb._require_agent().call("stat", path=path)
        return EntryInfo.from_agent(reply["stat"])

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except SandboxFileNotFound:
            return False
        except SandboxFileError as exc:
            if exc.agent_code is ErrorCode.NOT_A_DIRECTORY:
                return False
            raise
        return True

    async def make_dir(self, path: str) -> None:
        """Create a directory and its parents (no error if it exists)."""
        path = resolve_guest_path(path)
        await self._sb._require_agent().call("mkdir", path=path, parents=True, exist_ok=True)

    async def remove(self, path: str) -> None:
        """Remove a file, or a directory with its contents."""
        path = resolve_guest_path(path)
        await self._sb._require_agent().call("remove", path=path, recursive=True)


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
) -> int:
    """Write what ``chunks`` yields to ``path`` as it comes (parents created, file
    replaced), holding at most a chunk of it; returns the size. ``files.write`` with data
    that arrives over time (an HTTP upload). An error the source raises ends the transfer
    and propagates; the file then holds what was written so far."""
    path = resolve_guest_path(path)
    timeout = validate_timeout(timeout)
    mode = validate_mode(mode)
    deadline = deadline_after(timeout)
    agent = sandbox._require_agent()
    req = agent.open()
    try:
        await req.send_message("write_file", deadline, path=path, mode=mode, parents=True)
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
) -> AsyncGenerator[bytes, None]:
    """The bytes of a regular file as they come from the guest, in chunks; the guest
    runs at most a flow-control window ahead of the consumer, so the host holds no more
    than that of the file whatever its size. ``files.read`` for a consumer that passes
    the data on (an HTTP download). Errors are ``files.read``'s; one raised before the
    first chunk means nothing was sent. Closing the iterator early (``aclose``) cancels
    the read in the guest."""
    path = resolve_guest_path(path)
    timeout = validate_timeout(timeout)
    max_size = validate_byte_count(max_size, "max_size")
    deadline = deadline_after(timeout)
    agent = sandbox._require_agent()
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
        await req.send_message("read_file", deadline, path=path, max_size=max_size)
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
    "read_chunks",
    "read_stream",
    "validate_mode",
    "write_stream",
]
