"""Host side of the agent channel: one connection, many concurrent requests.

A reader task decodes frames from the socket and routes each to the queue of the request
it belongs to (by request id). Writes are whole frames, so requests interleave safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .errors import AgentError, AgentProtocolError, AgentTimeout, NovaSandboxError, from_agent
from .guest.protocol import (
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    Kind,
    ProtocolError,
    encode_frame,
    encode_message,
)

log = logging.getLogger("novasandbox.agent")

_CLOSED = Frame(0, Kind.MSG, b'{"op":"__closed__"}')
_RESTARTED = Frame(0, Kind.MSG, b'{"op":"__restarted__"}')


class AgentRequest:
    """The frames coming back for one request id."""

    def __init__(self, client: AgentClient, rid: int) -> None:
        self.client = client
        self.id = rid
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()

    async def next_frame(self, timeout: float | None = None) -> Frame:
        try:
            frame = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AgentTimeout(f"the guest agent did not answer within {timeout:.1f} s") from None
        if frame is _CLOSED:
            raise self.client.closed_error()
        if frame is _RESTARTED:
            raise AgentError("the guest agent restarted: this request was lost")
        return frame

    async def next_message(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message frame, skipping nothing: a data frame here is a protocol error."""
        frame = await self.next_frame(timeout)
        try:
            return frame.message()
        except ProtocolError as exc:
            raise AgentProtocolError(str(exc)) from exc

    async def send(self, kind: Kind, payload: bytes) -> None:
        await self.client.send_raw(encode_frame(self.id, kind, payload))

    async def send_message(self, op: str, **fields: Any) -> None:
        await self.client.send_raw(encode_message(self.id, op, **fields))

    def close(self) -> None:
        self.client.release(self.id)


def check_reply(msg: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Raise the public error for an agent ``error`` reply; return other replies."""
    if msg["op"] == "error":
        raise from_agent(str(msg.get("code", "agent-error")), str(msg.get("message", "")), path)
    return msg


class AgentClient:
    """A connection to one guest agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._requests: dict[int, AgentRequest] = {}
        self._wlock = asyncio.Lock()
        self._closed: NovaSandboxError | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        self.info: dict[str, Any] = {}
        self.connected_at = 0.0
        """When the socket connected (time.monotonic); the handshake followed."""

    @classmethod
    async def connect(
        cls, path: Path, *, deadline: float, hello: dict[str, Any], alive: Any = None
    ) -> AgentClient:
        """Connect to the VMM's socket for the agent and complete the handshake.

        ``alive`` (a callable) is polled so that a VM that dies while booting fails fast.
        """
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if alive is not None and not alive():
                    raise AgentError("the VM exited before its agent channel opened") from None
                if time.monotonic() > deadline:
                    raise AgentTimeout("the agent channel never opened") from None
                await asyncio.sleep(0.002)
        client = cls(reader, writer)
        client.connected_at = time.monotonic()
        try:
            await client._handshake(deadline, hello, alive)
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, deadline: float, hello: dict[str, Any], alive: Any) -> None:
        req = self.open()
        try:
            await req.send_message("hello", version=PROTOCOL_VERSION, **hello)
            while True:
                try:
                    msg = await req.next_message(timeout=0.05)
                    break
                except AgentTimeout:
                    if alive is not None and not alive():
                        raise AgentError("the VM exited before its agent answered") from None
                    if time.monotonic() > deadline:
                        raise AgentTimeout("the guest agent did not answer the handshake") from None
            if msg["op"] == "error":
                raise AgentProtocolError(f"handshake refused: {msg.get('message')}")
            if msg["op"] != "hello" or msg.get("version") != PROTOCOL_VERSION:
                raise AgentProtocolError(f"unexpected handshake reply {msg!r}")
            self.info = msg
        finally:
            req.close()

    def _connection_message(self, frame: Frame) -> None:
        """Frames on id 0 come from the agent itself, unasked."""
        try:
            msg = frame.message()
        except ProtocolError:
            return
        if msg["op"] == "agent-started" and self.info:
            # A new agent process: whatever the old one was doing for us is gone.
            log.warning("the guest agent restarted (pid %s)", msg.get("pid"))
            for req in list(self._requests.values()):
                req.queue.put_nowait(_RESTARTED)

    def closed_error(self) -> NovaSandboxError:
        return self._closed or AgentError("the agent connection is closed")

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        reason: NovaSandboxError = AgentError("the guest agent closed the connection")
        try:
            while data := await self._reader.read(1 << 18):
                for frame in decoder.feed(data):
                    if frame.request_id == 0:
                        self._connection_message(frame)
                        continue
                    req = self._requests.get(frame.request_id)
                    if req is not None:
                        req.queue.put_nowait(frame)
                    else:
                        log.debug("dropping frame for finished request %d", frame.request_id)
        except ProtocolError as exc:
            reason = AgentProtocolError(f"the guest agent broke the protocol: {exc}")
            log.warning("%s", reason)
        except (ConnectionError, OSError) as exc:
            reason = AgentError(f"lost the connection to the guest agent: {exc}")
        except asyncio.CancelledError:
            reason = AgentError("the agent connection was closed")
            raise
        finally:
            self._closed = reason
            for req in list(self._requests.values()):
                req.queue.put_nowait(_CLOSED)
            self._writer.close()

    def open(self) -> AgentRequest:
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        req = AgentRequest(self, rid)
        self._requests[rid] = req
        return req

    def release(self, rid: int) -> None:
        self._requests.pop(rid, None)

    async def send_raw(self, frame: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        async with self._wlock:
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                raise AgentError(f"lost the connection to the guest agent: {exc}") from exc

    async def call(
        self, op: str, /, *, timeout: float | None = 30.0, **fields: Any
    ) -> dict[str, Any]:
        """One request, one reply; agent errors become public exceptions."""
        req = self.open()
        try:
            await req.send_message(op, **fields)
            return check_reply(await req.next_message(timeout), str(fields.get("path", "")))
        finally:
            req.close()

    async def stream(
        self, op: str, *, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[Frame]:
        """Send one request and yield every frame of its answer until a final message."""
        req = self.open()
        try:
            await req.send_message(op, **fields)
            while True:
                frame = await req.next_frame(timeout)
                yield frame
                if frame.kind is Kind.MSG:
                    return
        finally:
            req.close()

    @property
    def is_open(self) -> bool:
        return self._closed is None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
