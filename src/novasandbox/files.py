"""The guest's file system: ``sandbox.files``. Async only; ``sync.py`` wraps it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

from .agent_client import check_reply
from .config import validate_guest_path
from .errors import (
    ConfigError,
    SandboxFileError,
    SandboxFileNotFound,
)
from .guest.protocol import CHUNK_SIZE, Kind

if TYPE_CHECKING:
    from .sandbox import AsyncSandbox


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


__all__ = ["AsyncFiles", "EntryInfo"]
