"""Host side of the agent channel: one connection, many concurrent requests.

The guest is hostile, so everything it sends is bounded here, in bytes, and checked:

* A reader task decodes frames and hands each one at once, without blocking, to the
  request it belongs to (by id). Data frames go to the request's sink (which keeps,
  counts or drops them as they arrive); messages wait in a small inbox (``INBOX_LIMIT``).
* Streams (command output, file reads) are flow-controlled: the agent may send
  ``WINDOW`` bytes (payload + ``FRAME_COST`` per frame) beyond what the host has
  acknowledged; the host acknowledges what its consumer has used. A request whose peer
  goes past its window, overflows its inbox or sends what it does not expect fails with
  ``AgentProtocolError``; the others carry on.
* Frames for requests that are no longer running are dropped; a channel that carries
  more than ``JUNK_LIMIT`` of them in a row is broken off.
* Every reply is checked against the protocol's schema (``protocol.check_reply``) in
  ``AgentRequest.reply``, the one place that turns agent messages into values or errors.
* Waits and sends take absolute deadlines (``time.monotonic()``), enforced by the clock
  whatever arrives; ``abort`` ends the channel at once without waiting for the guest.

Per connection, what the guest can make this process hold is therefore the sum over the
requests the host itself has open of each one's bound: ``INBOX_LIMIT`` (2 MiB) of unread
messages, ``WINDOW`` (16 MiB, ``FRAME_COST`` per frame counted) of unacknowledged data,
and what its consumer chose to keep (``max_output`` per stream of a command, ``max_size``
of a read, a watch's kept events); plus, for the connection, one partial frame (under
``MAX_PAYLOAD`` + header), the frames decoded from one read (``READ_SIZE`` of input, a
few MiB as objects when the frames are tiny) and ``WRITE_BUFFER_LIMIT`` queued towards
the guest. Frames for unknown or finished requests are never kept, only counted:
``JUNK_LIMIT`` (64 MiB) of them in a row breaks the channel, so they cost time, not
memory. The guest cannot open requests (ids are the host's; id 0 carries only small
unsolicited notices, checked and dropped at once), so the number of open requests, and
with it the total (about 18 MiB per concurrent streaming call plus its consumer's
limits), is the host's own choice. There is no connection-wide byte budget on top: one
shared by all requests would let a flooded stream use up the others' room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import MachineConfig
from .errors import AgentError, AgentProtocolError, AgentTimeout, NovaSandboxError, from_agent
from .guest.protocol import (
    ACK_STEP,
    FRAME_COST,
    INTERIM,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    WINDOW,
    ErrorCode,
    Frame,
    FrameDecoder,
    Kind,
    ProtocolError,
    check_reply,
    check_unsolicited,
    encode_frame,
    encode_message,
)

log = logging.getLogger("novasandbox.agent")

INBOX_LIMIT = 2 * (MAX_PAYLOAD + FRAME_COST)
"""Bytes of messages one request may hold unread: a reply or two. Requests expect one
message at a time, so only a broken peer fills it."""
JUNK_LIMIT = 64 << 20
"""Bytes of frames for requests that are not running, in a row, before the channel is
broken off (an honest agent sends at most a window's worth after the host gives up)."""
WRITE_BUFFER_LIMIT = 4 << 20
"""Bytes queued towards a guest that does not read before senders wait (with their
deadline) instead of queueing more."""
READ_SIZE = 1 << 18

Sink = Callable[[Frame], None]
"""Takes a request's data frames as they arrive, in the reader task: must not block; may
raise ``NovaSandboxError`` to fail the request; calls ``notify`` if it left something for
the request's waiter (not waking it per frame is most of the cost of a fast stream)."""


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``time.monotonic()``), never negative; None: none."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def within(timeout: float | None) -> str:
    """`` within N s`` for an error message (empty without a timeout)."""
    return "" if timeout is None else f" within {timeout:g} s"


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class AgentRequest:
    """One request id: what comes back for it, and its flow-control account."""

    def __init__(self, client: AgentClient, rid: int, sink: Sink | None) -> None:
        self.client = client
        self.id = rid
        self.op = ""
        """The operation it was opened for (the first message sent), which says which
        replies are valid."""
        self._sink = sink
        self._inbox: collections.deque[Frame] = collections.deque()
        self._inbox_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.failure: NovaSandboxError | None = None
        self.finished = False
        """Its final reply arrived: the agent sends nothing more for it."""
        self._unacked = 0
        """Data bytes received and not yet acknowledged (the peer's used window)."""
        self._consumed = 0
        """Data bytes consumed and not yet acknowledged."""

    # --- called by the reader task (synchronous, never blocks)

    def deliver(self, frame: Frame) -> None:
        if self.failure is not None:
            return
        cost = len(frame.payload) + FRAME_COST
        if frame.kind is Kind.MSG:
            if self._inbox_bytes + cost > INBOX_LIMIT:
                self.fail(AgentProtocolError(f"the guest agent flooded request {self.op!r}"))
                return
            self._inbox.append(frame)
            self._inbox_bytes += cost
        else:
            if self._sink is None or self.finished:
                self.fail(
                    AgentProtocolError(
                        f"the guest agent sent {frame.kind.name} data to request {self.op!r}"
                    )
                )
                return
            self._unacked += cost
            if self._unacked > WINDOW:
                self.fail(
                    AgentProtocolError(
                        f"the guest agent sent more than its {WINDOW >> 20} MiB flow-control "
                        f"window for request {self.op!r}"
                    )
                )
                return
            try:
                self._sink(frame)  # it notifies if it left work for the waiter
            except NovaSandboxError as exc:
                self.fail(exc)
            return
        self.notify()

    def notify(self) -> None:
        """Wake the task waiting on this request (something to look at)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: NovaSandboxError) -> None:
        """End the request with ``error`` (raised by its next wait); drop what it holds."""
        if self.failure is None:
            self.failure = error
            self._sink = None
            self._inbox.clear()
            self._inbox_bytes = 0
            self.client.forget(self)
            self.notify()

    # --- flow control

    def consumed(self, nbytes: int) -> None:
        """The consumer used ``nbytes`` of data (payload + ``FRAME_COST`` per frame): once
        a step's worth has been, the agent may send that much more."""
        self._consumed += nbytes
        if self._consumed >= ACK_STEP and not self.finished and self.failure is None:
            self.client.send_nowait(encode_message(self.id, "ack", bytes=self._consumed))
            self._unacked -= self._consumed
            self._consumed = 0

    # --- called by the request's owner

    async def send(self, kind: Kind, payload: bytes, deadline: float | None) -> None:
        await self.client.send_raw(encode_frame(self.id, kind, payload), deadline)

    async def send_message(self, op: str, deadline: float | None, **fields: Any) -> None:
        if not self.op:
            self.op = op
        try:
            frame = encode_message(self.id, op, **fields)
        except ProtocolError as exc:
            raise AgentError(f"cannot send {op!r} to the agent: {exc}") from exc
        await self.client.send_raw(frame, deadline)

    def take_message(self, expect: str | None = None, path: str = "") -> dict[str, Any] | None:
        """The next message, checked: a valid reply to this request (and ``expect`` when
        given), or the public error for an agent ``error`` reply; None if none is here."""
        if self.failure is not None:
            raise self.failure
        if not self._inbox:
            return None
        frame = self._inbox.popleft()
        self._inbox_bytes -= len(frame.payload) + FRAME_COST
        try:
            msg = check_reply(self.op, frame.message())
            if expect is not None and msg["op"] not in (expect, "error"):
                raise ProtocolError(f"expected {expect!r} in reply to {self.op!r}: {msg['op']!r}")
        except ProtocolError as exc:
            error = AgentProtocolError(f"bad reply from the guest agent: {exc}")
            self.fail(error)
            raise error from None
        self.finished = msg["op"] not in INTERIM
        if msg["op"] == "error":
            raise from_agent(ErrorCode(msg["code"]), msg["message"], path)
        return msg

    async def wait(self, deadline: float | None, what: str) -> None:
        """Return once something new may be here; raise the request's failure, or
        ``AgentTimeout`` naming ``what`` when ``deadline`` passes first."""
        if self.failure is not None:
            raise self.failure
        if self._inbox:
            return
        left = remaining(deadline)
        if left is not None and left <= 0:
            raise AgentTimeout(f"the guest agent did not {what}")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiter, left)
        except TimeoutError:
            raise AgentTimeout(f"the guest agent did not {what}") from None
        finally:
            self._waiter = None
        if self.failure is not None:
            raise self.failure

    async def reply(
        self,
        deadline: float | None,
        expect: str | None = None,
        *,
        what: str | None = None,
        path: str = "",
    ) -> dict[str, Any]:
        """Wait for the next message (see ``take_message``) until ``deadline``; ``what``
        the agent failed to do names the timeout, ``path`` the file of a file error."""
        while (msg := self.take_message(expect, path)) is None:
            await self.wait(deadline, what or f"answer {self.op!r} in time")
        return msg

    def close(self) -> None:
        """Done with this request. A stream still running is cancelled in the guest."""
        if self.failure is None and not self.finished and self._sink is not None:
            self.client.send_nowait(encode_message(self.id, "cancel"))
        self.finished = True
        self._sink = None  # it usually refers back to this request: no cycle to collect
        self.client.forget(self)


class AgentClient:
    """A connection to one guest agent."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_close: Callable[[NovaSandboxError], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._requests: dict[int, AgentRequest] = {}
        self._closed: NovaSandboxError | None = None
        self._on_close = on_close
        self._junk = 0
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        self.info: dict[str, Any] = {}
        self.connected_at = 0.0
        """When the socket connected (time.monotonic); the handshake followed."""

    @property
    def default_user(self) -> str:
        """The account the guest's calls run as when they name none: the template's, as
        the agent said in the handshake (an agent from before accounts: root)."""
        user = self.info.get("user")
        return user if isinstance(user, str) and user else "root"

    @classmethod
    async def connect(
        cls,
        path: Path,
        *,
        deadline: float,
        hello: dict[str, Any],
        alive: Any = None,
        on_close: Callable[[NovaSandboxError], None] | None = None,
    ) -> AgentClient:
        """Connect to the VMM's socket for the agent and complete the handshake.

        ``alive`` (a callable) is polled so that a VM that dies while booting fails fast;
        ``on_close`` is called with the reason when the channel ends other than by
        ``abort`` (not for a failed handshake).
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
        return await cls.over(
            reader, writer, deadline=deadline, hello=hello, alive=alive, on_close=on_close
        )

    @classmethod
    async def over(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        deadline: float,
        hello: dict[str, Any],
        alive: Any = None,
        on_close: Callable[[NovaSandboxError], None] | None = None,
    ) -> AgentClient:
        """Complete the handshake on an open byte stream to the agent (``connect``'s
        second half; a VM's ``open_channel`` gives the stream)."""
        client = cls(reader, writer)
        client.connected_at = time.monotonic()
        try:
            await client._handshake(deadline, hello, alive)
        except BaseException:
            client.abort(AgentError("the handshake failed"))
            await client.wait_closed()
            raise
        client._on_close = on_close
        return client

    async def _handshake(self, deadline: float, hello: dict[str, Any], alive: Any) -> None:
        req = self.open()
        try:
            await req.send_message("hello", deadline, version=PROTOCOL_VERSION, **hello)
            while True:
                try:
                    msg = await req.reply(min(deadline, time.monotonic() + 0.05))
                    break
                except AgentTimeout:
                    if alive is not None and not alive():
                        raise AgentError("the VM exited before its agent answered") from None
                    if time.monotonic() > deadline:
                        raise AgentTimeout("the guest agent did not answer the handshake") from None
                except AgentProtocolError:
                    raise
                except NovaSandboxError as exc:
                    raise AgentProtocolError(f"handshake refused: {exc}") from exc
            if msg["version"] != PROTOCOL_VERSION:
                raise AgentProtocolError(
                    f"the guest agent speaks protocol {msg['version']}, the host {PROTOCOL_VERSION}"
                )
            self.info = msg
        finally:
            req.close()

    def _connection_message(self, frame: Frame) -> None:
        """Frames on id 0 come from the agent itself, unasked."""
        try:
            msg = check_unsolicited(frame.message())
        except ProtocolError as exc:
            log.debug("ignoring a bad unsolicited message from the guest agent: %s", exc)
            return
        if msg["op"] == "agent-started" and self.info:
            # A new agent process: whatever the old one was doing for us is gone.
            log.warning("the guest agent restarted (pid %s)", msg["pid"])
            for req in list(self._requests.values()):
                req.fail(AgentError("the guest agent restarted: this request was lost"))

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        reason: NovaSandboxError = AgentError("the guest agent closed the connection")
        try:
            while data := await self._reader.read(READ_SIZE):
                for frame in decoder.feed(data):
                    self._route(frame)
        except ProtocolError as exc:
            reason = AgentProtocolError(f"the guest agent broke the protocol: {exc}")
            log.warning("%s", reason)
        except (ConnectionError, OSError) as exc:
            reason = AgentError(f"lost the connection to the guest agent: {exc}")
        except asyncio.CancelledError:
            reason = self._closed or AgentError("the agent connection was closed")
            raise
        finally:
            self._end(reason)

    def _route(self, frame: Frame) -> None:
        if frame.request_id == 0:
            self._connection_message(frame)
            return
        req = self._requests.get(frame.request_id)
        if req is not None:
            self._junk = 0
            req.deliver(frame)
            return
        # A request that ended (an honest agent sends at most a window more) or never was.
        self._junk += len(frame.payload) + FRAME_COST
        if self._junk > JUNK_LIMIT:
            raise ProtocolError(
                f"{JUNK_LIMIT >> 20} MiB of frames in a row for requests that are not running"
            )

    def _end(self, reason: NovaSandboxError) -> None:
        first = self._closed is None
        if first:
            self._closed = reason
        for req in list(self._requests.values()):
            req.fail(self._closed or reason)
        self._requests.clear()
        self._writer.transport.abort()
        if first and self._on_close is not None:
            self._on_close(reason)

    def open(self, sink: Sink | None = None) -> AgentRequest:
        """A new request; ``sink`` takes its data frames (only requests that stream data
        have one, and they are flow-controlled)."""
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        req = AgentRequest(self, rid, sink)
        self._requests[rid] = req
        return req

    def forget(self, req: AgentRequest) -> None:
        if self._requests.get(req.id) is req:
            del self._requests[req.id]

    def send_nowait(self, frame: bytes) -> None:
        """Queue a small control frame (ack, cancel) without waiting (dropped if the
        channel is closed). Never more than one per ``ACK_STEP`` bytes received, or one
        per request, so a guest that does not read cannot make them pile up."""
        if self._closed is None:
            self._writer.write(frame)

    async def send_raw(self, frame: bytes, deadline: float | None) -> None:
        """Send one whole frame; ``AgentTimeout`` if the guest does not take it in time.
        Frames are queued whole, so one that times out still goes out intact later."""
        if self._closed is not None:
            raise self._closed
        try:
            if self._writer.transport.get_write_buffer_size() >= WRITE_BUFFER_LIMIT:
                await self._drain(deadline)
            self._writer.write(frame)
            await self._drain(deadline)
        except NovaSandboxError:
            raise  # AgentTimeout is an OSError too
        except (ConnectionError, OSError) as exc:
            raise self._closed or AgentError(
                f"lost the connection to the guest agent: {exc}"
            ) from exc

    async def _drain(self, deadline: float | None) -> None:
        try:
            await asyncio.wait_for(self._writer.drain(), remaining(deadline))
        except TimeoutError:
            raise AgentTimeout("the guest agent stopped reading what the host sends") from None
        if self._closed is not None:
            raise self._closed

    def post(self, op: str, /, **fields: Any) -> None:
        """Send a request whose reply nobody waits for (best effort; it is dropped)."""
        if self._closed is None:
            req = self.open()
            req.op = op
            self.send_nowait(encode_message(req.id, op, **fields))
            req.close()

    async def call(
        self, op: str, /, *, timeout: float | None = 30.0, **fields: Any
    ) -> dict[str, Any]:
        """One request, one reply (checked); agent errors become public exceptions."""
        deadline = deadline_after(timeout)
        req = self.open()
        try:
            await req.send_message(op, deadline, **fields)
            what = f"answer {op!r}{within(timeout)}"
            return await req.reply(deadline, what=what, path=str(fields.get("path", "")))
        finally:
            req.close()

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def ending(self, reason: NovaSandboxError) -> None:
        """Say why the channel is about to end (before its VM is stopped): every call in
        flight, and every later one, fails with ``reason`` rather than a lost connection."""
        self._on_close = None
        if self._closed is None:
            self._closed = reason

    def abort(self, reason: NovaSandboxError) -> None:
        """End the channel now: drop the connection without waiting for the guest to read
        anything, fail every request with ``reason``. Idempotent; ``on_close`` is not
        called."""
        self._on_close = None
        if self._closed is None:
            self._closed = reason
        self._task.cancel()
        self._end(reason)

    async def wait_closed(self) -> None:
        """Wait for the reader task to end (after ``abort``: at once)."""
        with contextlib.suppress(BaseException):
            await self._task

    async def close(self) -> None:
        self.abort(AgentError("the agent connection was closed"))
        await self.wait_closed()


class AgentHolder(Protocol):
    """What ``commands`` and ``files`` need of their sandbox (``AsyncSandbox``): its id,
    its machine config (the default environment), and its agent."""

    id: str
    config: MachineConfig

    def _require_agent(self) -> AgentClient:
        """The agent, or the sandbox's own error when it has none (killed, crashed...)."""

    async def _raise_if_crashed(self, grace: float = 2.0) -> None:
        """After the channel broke: raise ``SandboxCrashed`` if the VM is ending."""
