"""Admission control: the server refuses what it cannot take now, at once, instead of
letting requests pile up (a client waits a bounded time, never forever).

Three bounds, each refused with ``ServerBusy`` (HTTP 503, ``Retry-After``, code
``server-busy``) before anything is changed:

- ``max_sandboxes``: sandboxes alive at once (running, paused, starting: every create in
  flight counts), whoever owns them. Default: one per ``SANDBOX_MIB_PER_SLOT`` MiB of the
  host's memory (a ceiling; each create's own host-memory check still refuses with
  ``host-memory-exhausted`` when memory runs short first).
- ``max_starting``: creates that run at once (each restore or boot costs CPU: more at
  once only makes each slower). Default: the CPU count. A create beyond it waits for a
  slot in a queue of at most ``QUEUE_PER_SLOT`` x ``max_starting`` creates, each for at
  most ``max_queue_wait`` seconds; a full queue or a wait that runs out is refused.
- ``max_requests``: HTTP requests in progress at once (a streaming command or transfer
  holds one while it runs); ``/healthz`` is never refused. Default ``DEFAULT_MAX_REQUESTS``.

A refused request changes nothing: the create never began, the request was never routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ServerBusy

SANDBOX_MIB_PER_SLOT = 256
"""Host memory (MiB) per sandbox of the default ``max_sandboxes``."""
QUEUE_PER_SLOT = 8
"""Creates that may wait for a start slot, per slot."""
DEFAULT_MAX_REQUESTS = 512
DEFAULT_QUEUE_WAIT = 30.0

P = ParamSpec("P")
T = TypeVar("T")


def host_memory_mib() -> int:
    """MemTotal of the host in MiB (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def default_max_starting() -> int:
    return max(1, os.cpu_count() or 1)


def default_max_sandboxes() -> int:
    return max(4, host_memory_mib() // SANDBOX_MIB_PER_SLOT)


@dataclass(frozen=True, slots=True)
class Limits:
    max_sandboxes: int
    max_starting: int
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_queue_wait: float = DEFAULT_QUEUE_WAIT
    """Seconds a create waits for a start slot before it is refused."""

    @classmethod
    def default(cls) -> Limits:
        return cls(max_sandboxes=default_max_sandboxes(), max_starting=default_max_starting())

    @property
    def max_queued(self) -> int:
        return QUEUE_PER_SLOT * self.max_starting


class Admission:
    """The bounds of one server; ``alive`` counts its sandboxes alive now (not those in
    flight, which this counts itself)."""

    def __init__(self, limits: Limits, alive: Callable[[], int]) -> None:
        self.limits = limits
        self.alive = alive
        self.starting = 0
        """Creates admitted and not done (queued for a slot or running)."""
        self.queued = 0
        self.requests = 0
        self.refused = 0
        self._slots = asyncio.Semaphore(limits.max_starting)

    def _refuse(self, why: str) -> ServerBusy:
        self.refused += 1
        return ServerBusy(f"the server is busy: {why}; retry later")

    @contextlib.asynccontextmanager
    async def create(self) -> AsyncIterator[None]:
        """Hold a create's place for its whole run (``ServerBusy`` when there is none)."""
        limits = self.limits
        if self.alive() + self.starting >= limits.max_sandboxes:
            raise self._refuse(f"it runs its maximum of {limits.max_sandboxes} sandboxes")
        waiting = self._slots.locked()
        if waiting and self.queued >= limits.max_queued:
            raise self._refuse(f"{self.queued} creates already wait to start")
        self.starting += 1
        try:
            if waiting:
                self.queued += 1
                try:
                    # (not wait_for: on 3.11 it can lose a slot it acquired when cancelled)
                    async with asyncio.timeout(limits.max_queue_wait):
                        await self._slots.acquire()
                except TimeoutError:
                    raise self._refuse(
                        f"no start slot came free in {limits.max_queue_wait:g} s"
                    ) from None
                finally:
                    self.queued -= 1
            else:
                await self._slots.acquire()
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self.starting -= 1

    def limit(self, create: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        """``create`` (a coroutine function), run within ``self.create()``."""

        async def admitted(*args: P.args, **kwargs: P.kwargs) -> T:
            async with self.create():
                return await create(*args, **kwargs)

        return admitted


class RequestLimit:
    """ASGI middleware: at most ``admission.limits.max_requests`` HTTP requests in
    progress; one more gets the 503 error response of ``refuse`` (``/healthz`` never)."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        refuse: Callable[[ServerBusy], ASGIApp],
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.admission = admission
        self.refuse = refuse
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        a = self.admission
        if a.requests >= a.limits.max_requests:
            busy = a._refuse(f"{a.requests} requests are in progress")
            await self.refuse(busy)(scope, receive, send)
            return
        a.requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            a.requests -= 1


__all__ = [
    "Admission",
    "Limits",
    "RequestLimit",
    "default_max_sandboxes",
    "default_max_starting",
    "host_memory_mib",
]
