"""The sandboxes a server owns, and whose they are.

Each sandbox is an ``AsyncSandbox`` on the server's event loop (its lifetime timer
included) and belongs to the API key that created it: for any other key it does not
exist (``SandboxNotFound``, the same error as for an id nobody has). A sandbox that ended
on its own (lifetime over, crashed) stays listed with that state for ``ENDED_KEPT``
seconds, so its owner learns what happened, then is forgotten; a crashed one is killed
at once to release what it held. ``close`` kills them all (the server's shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    NovaSandboxError,
    SandboxCrashed,
    SandboxExpired,
    SandboxNotFound,
    SandboxNotRunning,
)
from ..sandbox import AsyncSandbox, SandboxState
from .pools import WarmPools

log = logging.getLogger("novasandbox.server")

ENDED_KEPT = 600.0
"""Seconds a sandbox that ended on its own stays visible to its owner."""
SWEEP_EVERY = 5.0
ENDED_STATES = (SandboxState.KILLED, SandboxState.CRASHED, SandboxState.ERROR)


class ShuttingDown(SandboxNotRunning):
    """Not a public error class: a create refused (or undone) because the server is
    stopping. Its code is its parent's, ``sandbox-not-running``."""

    code = SandboxNotRunning.code


@dataclass
class Owned:
    sandbox: AsyncSandbox
    owner: str
    """The public id of the API key that created it."""
    labels: dict[str, str]
    created_at: float = field(default_factory=time.time)
    ended: SandboxState | None = None
    """The state it ended in on its own (crashed, killed by its lifetime), once seen."""
    ended_at: float = 0.0
    crash_reason: str | None = None
    pooled: bool = False
    """Handed over from the server's warm pool (not made for this create)."""

    @property
    def id(self) -> str:
        return self.sandbox.id

    @property
    def state(self) -> SandboxState:
        return self.ended or self.sandbox.state

    def ended_error(self) -> NovaSandboxError | None:
        """The error an operation on it raises once it ended (None: it has not)."""
        sb = self.sandbox
        if self.ended is SandboxState.CRASHED:
            return SandboxCrashed(
                f"sandbox {sb.id} crashed: {self.crash_reason}", self.crash_reason or ""
            )
        if sb.expired:
            return SandboxExpired(
                f"sandbox {sb.id} reached the end of its lifetime and was killed; give it "
                "longer with the create's timeout or by setting its timeout"
            )
        if self.state in ENDED_STATES:
            return SandboxNotRunning(f"sandbox {sb.id} is {self.state.value}")
        return None

    def live(self) -> AsyncSandbox:
        """The sandbox, or the error saying why it cannot be used any more."""
        error = self.ended_error()
        if error is not None:
            raise error
        return self.sandbox

    def to_json(self) -> dict[str, Any]:
        sb = self.sandbox
        ports: dict[str, str] = {}
        if self.state is SandboxState.RUNNING:
            for port in sb.config.network.ports:
                with contextlib.suppress(NovaSandboxError):
                    ports[str(port)] = sb.get_host(port)
        return {
            "id": sb.id,
            "template": sb.template,
            "state": self.state.value,
            "expired": sb.expired,
            "crash_reason": self.crash_reason,
            "labels": self.labels,
            "created_at": self.created_at,
            "expires_at": sb.deadline,
            "vcpus": sb.config.vcpus,
            "memory_mib": sb.config.memory_mib,
            "network": sb.config.network.mode,
            "ports": ports,
            "restored": sb.restored,
            "provider": sb.provider,
            "pooled": self.pooled,
        }


class Registry:
    """The server's sandboxes by id, with their owner and labels."""

    def __init__(self, provider: str | None = None, pools: WarmPools | None = None) -> None:
        self.provider = provider
        """The provider its sandboxes run on (None: ``NOVASANDBOX_PROVIDER`` or the
        default)."""
        self._owned: dict[str, Owned] = {}
        self._closing = False
        self.pools = pools or WarmPools({}, provider)
        """The warm pools creates are served from when they can be (``pools.py``)."""
        self._killing: set[asyncio.Task[None]] = set()

    async def create(self, owner: str, labels: Mapping[str, str], **arguments: Any) -> Owned:
        """A new sandbox for ``owner`` (``AsyncSandbox.create``'s ``arguments``)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        pooled = await self.pools.take(arguments)
        if pooled is not None:
            sb = pooled
        else:
            sb = await AsyncSandbox.create(provider=self.provider, **arguments)
        if self._closing:
            await sb.kill()
            raise ShuttingDown(f"the server is shutting down: sandbox {sb.id} was killed")
        owned = Owned(sb, owner, dict(labels), pooled=pooled is not None)
        self._owned[sb.id] = owned
        log.info(
            "sandbox created",
            extra={
                "fields": {
                    "sandbox": sb.id,
                    "key": owner,
                    "restored": sb.restored,
                    "pooled": owned.pooled,
                }
            },
        )
        return owned

    def get(self, owner: str, sandbox_id: str) -> Owned:
        """``owner``'s sandbox ``sandbox_id``; ``SandboxNotFound`` whether it does not
        exist or is someone else's (the same message: nothing tells them apart)."""
        owned = self._owned.get(sandbox_id)
        if owned is None or owned.owner != owner:
            raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
        self._observe(owned)
        return owned

    def list(
        self,
        owner: str,
        labels: Mapping[str, str] | None = None,
        states: Sequence[SandboxState] = (),
    ) -> list[Owned]:
        found = []
        for owned in list(self._owned.values()):
            if owned.owner != owner:
                continue
            self._observe(owned)
            if labels and any(owned.labels.get(k) != v for k, v in labels.items()):
                continue
            if states and owned.state not in states:
                continue
            found.append(owned)
        return sorted(found, key=lambda o: o.created_at)

    def states(self) -> Counter[SandboxState]:
        """How many sandboxes (of every owner) are in each state."""
        counts: Counter[SandboxState] = Counter()
        for owned in list(self._owned.values()):
            self._observe(owned)
            counts[owned.state] += 1
        return counts

    async def kill(self, owner: str, sandbox_id: str, wait: bool = True) -> None:
        """Kill ``owner``'s sandbox; ``wait=False``: it is gone from the registry at
        once and the VM is killed in the background (``close`` waits for those)."""
        if not wait:
            self.get(owner, sandbox_id)  # not found: the caller's error, not the task's
            task = asyncio.get_running_loop().create_task(self.kill(owner, sandbox_id))
            self._killing.add(task)
            task.add_done_callback(self._killed_in_background)
            await asyncio.sleep(0)  # its first step runs now: out of the registry at once
            return
        owned = self.get(owner, sandbox_id)
        self._owned.pop(sandbox_id, None)
        await owned.sandbox.kill()
        log.info("sandbox killed", extra={"fields": {"sandbox": sandbox_id, "key": owner}})

    def _killed_in_background(self, task: asyncio.Task[None]) -> None:
        self._killing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "could not kill a sandbox", extra={"fields": {"error": str(task.exception())}}
            )

    def _observe(self, owned: Owned) -> None:
        """Note once that a sandbox ended on its own (the first look at ``state`` after
        its VM ended makes it ``crashed``)."""
        if owned.ended is not None:
            return
        state = owned.sandbox.state
        if state is SandboxState.CRASHED:
            owned.crash_reason = owned.sandbox.crash_reason
        elif not (state is SandboxState.KILLED and owned.sandbox.expired):
            return
        owned.ended, owned.ended_at = state, time.time()
        log.warning(
            "sandbox ended",
            extra={
                "fields": {
                    "sandbox": owned.id,
                    "key": owned.owner,
                    "state": state.value,
                    "expired": owned.sandbox.expired,
                    "reason": owned.crash_reason,
                }
            },
        )

    async def sweep(self) -> None:
        """Release crashed sandboxes; forget the ones that ended long enough ago."""
        now = time.time()
        for owned in list(self._owned.values()):
            self._observe(owned)
            if owned.ended is SandboxState.CRASHED:
                with contextlib.suppress(NovaSandboxError):
                    await owned.sandbox.kill()  # releases; our record keeps "crashed"
            if owned.ended is not None and now - owned.ended_at > ENDED_KEPT:
                self._owned.pop(owned.id, None)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self.sweep()
            except Exception:  # keep sweeping
                log.exception("sweeping sandboxes failed")

    async def close(self) -> None:
        """Kill every sandbox (and refuse new ones), the pooled ones too. Idempotent."""
        self._closing = True
        await self.pools.close()
        if self._killing:
            await asyncio.gather(*list(self._killing), return_exceptions=True)
        owned = list(self._owned.values())
        self._owned.clear()
        results = await asyncio.gather(*(o.sandbox.kill() for o in owned), return_exceptions=True)
        for o, result in zip(owned, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "could not kill a sandbox at shutdown",
                    extra={"fields": {"sandbox": o.id, "error": str(result)}},
                )
        if owned:
            log.info("killed the server's sandboxes", extra={"fields": {"count": len(owned)}})

    def __len__(self) -> int:
        return len(self._owned)


__all__ = ["ENDED_KEPT", "Owned", "Registry", "ShuttingDown"]
