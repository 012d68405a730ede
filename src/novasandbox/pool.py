"""A warm pool: N sandboxes restored ahead of time, handed over in milliseconds.

``AsyncPool`` keeps ``size`` ready sandboxes of one template. ``acquire()`` takes one
(the pool forgets it: the caller owns it and kills it) and the pool refills in the
background. A sandbox is handed out once at most; one that died while waiting is
discarded. ``close()`` stops refilling and kills every sandbox the pool still holds,
including ones that finish starting after the close.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from .config import validate_env, validate_lifetime
from .errors import NovaSandboxError, PoolClosed, SandboxError, check_int
from .sandbox import DEFAULT_LIFETIME, AsyncSandbox
from .templates import TemplateManager
from .vm import get_provider

log = logging.getLogger("novasandbox.pool")

WARMUP = ["/bin/bash", "-l", "-c", "/bin/true; echo warm"]
"""Run in each new pooled sandbox before it is handed out: the path of a first command
(a login shell as the template's user) is then warm in its VMM."""
IDLE_LIFETIME = 3600.0
"""A sandbox waiting in the pool expires after this (and the pool replaces it); the
pool's ``timeout`` starts when it is acquired."""


class AsyncPool:
    """Keeps ``size`` sandboxes of ``template`` ready. Use ``async with AsyncPool(...)``."""

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
        check_int("pool size", size, 1, 256)
        check_int("parallel", parallel, 1)
        self.template = template
        self.size = size
        self.env = dict(validate_env(env))
        self.timeout = validate_lifetime(timeout)
        """The lifetime each sandbox gets when it is acquired."""
        self.parallel = parallel
        self._templates = templates or TemplateManager()
        self._provider = get_provider(provider).name
        # fail now, not in the background
        if get_provider(self._provider).capabilities.needs_image:
            self._templates.require_built(template)
        else:
            self._templates.get(template)
        self._ready: collections.deque[AsyncSandbox] = collections.deque()
        self._filling = 0
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = False
        self._adoptable = False
        """Whether its sandboxes are made adoptable (``AsyncSandbox.create``; the server's
        pools when its sandboxes outlive it)."""
        self._on_made: Callable[[AsyncSandbox], None] | None = None
        """Called with each sandbox it makes, before its warm-up (the server's pools:
        recorded as pooled, so a restart after a crash reaps it)."""
        self._refill_delay = 0.0
        """Seconds a refill started by an acquire waits before it creates (the server's
        pools: the new owner's first command does not share the CPUs with a restore)."""
        self.last_error: BaseException | None = None

    @property
    def ready(self) -> int:
        """Sandboxes waiting to be acquired."""
        return len(self._ready)

    async def start(self) -> AsyncPool:
        if not self._started:
            self._started = True
            self._refill()
        return self

    def _refill(self, delay: float = 0.0) -> None:
        while not self._closed and len(self._ready) + self._filling < self.size:
            if self._filling >= self.parallel:
                break
            self._filling += 1
            task = asyncio.get_running_loop().create_task(self._fill_one(delay))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fill_one(self, delay: float = 0.0) -> None:
        sb: AsyncSandbox | None = None
        try:
            if delay:
                await asyncio.sleep(delay)
                if self._closed:
                    return
            sb = await AsyncSandbox._create_local(
                self.template,
                env=self.env,
                timeout=IDLE_LIFETIME,
                templates=self._templates,
                provider=self._provider,
                adoptable=self._adoptable,
            )
            try:
                if self._on_made is not None:
                    self._on_made(sb)
                # A restored VM translates its code afresh (TCG): run the command path once
                # so that the first command of whoever acquires it is as fast as later ones.
                await sb.commands.run(WARMUP, timeout=30, check=True)
            except BaseException:
                await sb.kill()
                sb = None
                raise
        except Exception as exc:
            self.last_error = exc
            log.warning("pool %s: could not create a sandbox: %s", self.template, exc)
            await asyncio.sleep(1.0)  # do not spin on a broken template
        finally:
            self._filling -= 1
        async with self._changed:
            if sb is not None:
                if self._closed:
                    await sb.kill()
                else:
                    self._ready.append(sb)
            self._changed.notify_all()
        if not self._closed:
            self._refill()

    async def acquire(self, timeout: float | None = None) -> AsyncSandbox:
        """Take a ready sandbox (waiting for one if none is ready yet). The caller owns
        it from now on; the pool starts a replacement."""
        return await self._acquire(timeout, self.timeout)

    async def _acquire(self, timeout: float | None, lifetime: float | None) -> AsyncSandbox:
        """``acquire``, the sandbox getting ``lifetime`` (seconds; None: no limit) instead
        of the pool's ``timeout`` (the server's pools: each create has its own)."""
        lifetime = validate_lifetime(lifetime)
        await self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._changed:
            while True:
                if self._closed:
                    raise PoolClosed("the pool is closed")
                while self._ready:
                    sb = self._ready.popleft()
                    if sb.is_running():
                        self._refill(self._refill_delay)
                        # the caller's lifetime starts now; it is set in the background so
                        # that the hand-over does not wait for the guest's answer
                        task = asyncio.get_running_loop().create_task(self._retime(sb, lifetime))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                        return sb
                    log.warning("pool %s: dropping dead sandbox %s", self.template, sb.id)
                    await sb.kill()
                self._refill()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise SandboxError("no pooled sandbox became ready in time")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def _retime(self, sb: AsyncSandbox, lifetime: float | None) -> None:
        try:
            await sb.set_timeout(lifetime)
        except NovaSandboxError as exc:  # e.g. the new owner killed it at once
            log.debug("pool %s: lifetime of %s not set: %s", self.template, sb.id, exc)

    async def close(self) -> None:
        """Stop refilling and kill every sandbox still in the pool. Idempotent."""
        self._closed = True
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._changed:
            idle = list(self._ready)
            self._ready.clear()
            self._changed.notify_all()
        await asyncio.gather(*(sb.kill() for sb in idle), return_exceptions=True)

    async def __aenter__(self) -> AsyncPool:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
