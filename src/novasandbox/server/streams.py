"""Response bodies sent while they are made: command output as NDJSON, file downloads.

``Streamed`` sends what an async iterator yields and watches the connection meanwhile:
when the client goes away, the iterator is closed and ``on_abort`` runs (for a command:
kill it). A body that fails after its first bytes went out ends the connection without
the final chunk, so the client sees a truncated response, never a complete-looking one.

A command's events, one JSON object per line (``application/x-ndjson``)::

    {"type": "started", "pid": 42}
    {"type": "stdout", "data": "hi\\n"}          (decoded UTF-8, as it arrives)
    {"type": "stderr", "data": "..."}
    {"type": "exit", "exit_code": 0, "signal": null, "timed_out": false, "duration": 0.03}
    {"type": "error", "error": {"code": "sandbox-not-running", "message": "..."}}

The last line is ``exit`` (the command ended; ``timed_out`` when its timeout killed it,
``signal`` when a signal ended it) or ``error`` (the sandbox was killed, expired or
crashed meanwhile, or the agent failed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..commands import AsyncCommandHandle
from ..errors import CommandTimeout, NovaSandboxError
from ..results import CommandResult
from ..terminal import AsyncTerminalHandle

log = logging.getLogger("novasandbox.server")

NDJSON = "application/x-ndjson"
QUEUED_EVENTS = 64
"""Output events waiting for a slow client before the command's output waits too (and
then, by the agent's flow control, the command itself)."""


def error_body(exc: NovaSandboxError) -> dict[str, str]:
    return {"code": exc.code, "message": exc.message}


def _line(event: Mapping[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


class Streamed(Response):
    """Sends what ``body`` yields (bytes) as the response body, chunked."""

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        media_type: str,
        on_abort: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.init_headers({"cache-control": "no-store"})
        del self.headers["content-length"]
        self._source = body
        self._on_abort = on_abort

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self._source:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        completed = False
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                completed = not pump.cancelled() and pump.exception() is None
                pump.result()  # a body that failed: the connection ends without the last chunk
        finally:
            for task in (watch, pump):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self._source.aclose()
            if not completed and self._on_abort is not None:
                # also when this task itself is cancelled (the server stopping)
                await asyncio.shield(self._on_abort())


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class CommandStream:
    """A running command's events, for ``Streamed``: the output callbacks queue them,
    ``events`` yields them as lines."""

    def __init__(self, sandbox_id: str, on_error: Callable[[str], None] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.on_error = on_error
        """Called with the code of the error that ends the stream (if one does)."""
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUED_EVENTS)
        self._closed = False
        self.handle: AsyncCommandHandle | AsyncTerminalHandle | None = None

    async def _put(self, event: dict[str, Any] | None) -> None:
        if not self._closed:
            await self._queue.put(event)

    async def stdout(self, text: str) -> None:
        await self._put({"type": "stdout", "data": text})

    async def stderr(self, text: str) -> None:
        await self._put({"type": "stderr", "data": text})

    async def terminal(self, data: bytes) -> None:
        """What a terminal showed: bytes, so base64 (a terminal's output need not be
        UTF-8, nor cut at character boundaries)."""
        await self._put({"type": "pty", "data": base64.b64encode(data).decode("ascii")})

    async def events(self) -> AsyncGenerator[bytes, None]:
        handle = self.handle
        assert handle is not None
        yield _line({"type": "started", "pid": handle.pid, "argv": list(handle.argv)})
        finisher = asyncio.ensure_future(self._finish(handle))
        try:
            while (event := await self._queue.get()) is not None:
                yield _line(event)
        finally:
            self._closed = True
            while not self._queue.empty():  # frees callbacks waiting for room
                self._queue.get_nowait()
            finisher.cancel()

    async def _finish(self, handle: AsyncCommandHandle | AsyncTerminalHandle) -> None:
        event: dict[str, Any]
        try:
            event = exit_event(await handle.wait(), timed_out=False)
        except CommandTimeout as exc:
            event = exit_event(exc.result, timed_out=True)
        except NovaSandboxError as exc:
            event = {"type": "error", "error": error_body(exc)}
            if self.on_error is not None:
                self.on_error(exc.code)
        await self._put(event)
        await self._put(None)

    async def detach(self) -> None:
        """The client of a connection (``connect``) went away: the command runs on."""
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        if self.handle is not None:
            self.handle.disconnect()

    async def abort(self) -> None:
        """The client went away: kill the command (its whole process group)."""
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        handle = self.handle
        if handle is None or handle.done():
            return
        try:
            await handle.kill()
            log.info(
                "command killed: its client disconnected",
                extra={"fields": {"sandbox": self.sandbox_id, "pid": handle.pid}},
            )
        except NovaSandboxError as exc:
            log.info(
                "could not kill the command of a disconnected client",
                extra={"fields": {"sandbox": self.sandbox_id, "error": exc.code}},
            )


def exit_event(result: CommandResult, *, timed_out: bool) -> dict[str, Any]:
    return {
        "type": "exit",
        "exit_code": result.exit_code,
        "signal": result.signal,
        "timed_out": timed_out,
        "duration": round(result.duration, 6),
        "missed": result.missed,
    }


__all__ = ["NDJSON", "CommandStream", "Streamed", "error_body", "exit_event"]
