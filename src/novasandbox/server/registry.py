"""The sandboxes a server owns, and whose they are.

Each sandbox is an ``AsyncSandbox`` on the server's event loop (its lifetime timer
included) and belongs to the API key that created it: for any other key it does not
exist (``SandboxNotFound``, the same error as for an id nobody has). A sandbox that ended
on its own (lifetime over, crashed) stays listed with that state for ``ENDED_KEPT``
seconds, so its owner learns what happened, then is forgotten; a crashed one is killed
at once to release what it held. ``close`` kills them all (the server's shutdown), or,
with ``on_stop = "keep"``, leaves them running for the next start to adopt.

Restarts: with a ``store`` (``owners.py``), the registry creates its sandboxes
``adoptable`` (where the provider can) and keeps, per sandbox, whose it is, its labels
and when it was made, from its create until it is killed or seen ended. ``adopt_all``,
at the start of the server, takes back every sandbox the store names whose VMM still
runs (``AsyncSandbox.adopt``: agent and control sockets reconnected, the lifetime's
deadline kept and enforced here again) and reaps the others, and a warm pool's idle
sandboxes (recorded ``pooled`` by ``WarmPools``: nobody's yet). Snapshots made through the
server (``snapshot``, ``fork``'s children, ``create(from_snapshot=...)``) belong to keys
the same way.
"""

from __future__ import annotations

import asyncio
import builtins
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
    SandboxOwned,
    SnapshotNotFound,
)
from ..gc import kill_sandbox
from ..records import read_record, sandboxes_dir
from ..sandbox import AsyncSandbox, SandboxState
from ..snapshots import Snapshot, delete_snapshot, get_snapshot
from ..vm import get_provider
from .owners import OwnerStore, SandboxRecord, SnapshotRecord
from .pools import WarmPools

log = logging.getLogger("novasandbox.server")

ENDED_KEPT = 600.0
"""Seconds a sandbox that ended on its own stays visible to its owner."""
SWEEP_EVERY = 5.0
ENDED_STATES = (SandboxState.KILLED, SandboxState.CRASHED, SandboxState.ERROR)


def _owner_alive(sandbox_id: str) -> bool:
    """Whether a live process owns the sandbox (its record says so)."""
    info = read_record(sandboxes_dir() / sandbox_id)
    return info is not None and info.owner_alive


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

    def __init__(
        self,
        provider: str | None = None,
        store: OwnerStore | None = None,
        pools: WarmPools | None = None,
    ) -> None:
        self.provider = provider
        """The provider its sandboxes run on (None: ``NOVASANDBOX_PROVIDER`` or the
        default)."""
        self._owned: dict[str, Owned] = {}
        self._closing = False
        self.store = store
        """Where whose each sandbox is survives a restart (None: nowhere)."""
        self.on_stop = "kill"
        """What ``close`` does with the sandboxes: "kill", or "keep" (left running for
        the next start, which adopts them; needs a ``store``)."""
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
            sb = await AsyncSandbox._create_local(
                provider=self.provider, adoptable=self._adoptable(), **arguments
            )
        if self._closing:
            await sb.kill()
            raise ShuttingDown(f"the server is shutting down: sandbox {sb.id} was killed")
        owned = self._own(sb, owner, labels)
        owned.pooled = pooled is not None
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
        self._forget(sandbox_id)
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
        self._forget(owned.id)
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
        """Kill every sandbox (and refuse new ones), the pooled ones too; or, if
        ``on_stop`` is "keep", leave the owned ones running. Idempotent."""
        self._closing = True
        await self.pools.close()
        if self._killing:
            await asyncio.gather(*list(self._killing), return_exceptions=True)
        owned = list(self._owned.values())
        self._owned.clear()
        if owned and self.on_stop == "keep" and self._adoptable():  # else they die with us
            log.info(
                "left the server's sandboxes running, for the next start to adopt",
                extra={"fields": {"count": len(owned), "sandboxes": [o.id for o in owned]}},
            )
            return
        results = await asyncio.gather(*(o.sandbox.kill() for o in owned), return_exceptions=True)
        for o, result in zip(owned, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "could not kill a sandbox at shutdown",
                    extra={"fields": {"sandbox": o.id, "error": str(result)}},
                )
            else:
                self._forget(o.id)
        if owned:
            log.info("killed the server's sandboxes", extra={"fields": {"count": len(owned)}})

    def __len__(self) -> int:
        return len(self._owned)

    # --- ownership across restarts, snapshots and forks

    def _adoptable(self) -> bool:
        """Whether new sandboxes are made adoptable: with a store, where the provider
        can."""
        return self.store is not None and get_provider(self.provider).capabilities.adoptable

    def _own(self, sb: AsyncSandbox, owner: str, labels: Mapping[str, str]) -> Owned:
        owned = Owned(sb, owner, dict(labels))
        self._owned[sb.id] = owned
        if self.store is not None:
            self.store.save_sandbox(SandboxRecord(sb.id, owner, owned.labels, owned.created_at))
        return owned

    def _forget(self, sandbox_id: str) -> None:
        if self.store is not None:
            self.store.forget_sandbox(sandbox_id)

    async def adopt_all(self) -> tuple[builtins.list[str], builtins.list[str]]:
        """Take back the sandboxes the store names (the server's start): each one whose
        VMM runs is adopted, every other one is reaped (what it left released, its
        record removed). Returns the ids adopted and the ids reaped; logs each."""
        if self.store is None:
            return [], []
        records, damaged = self.store.sandboxes()
        for name in damaged:  # whose it was is lost: its sandbox (if any) is reaped
            with contextlib.suppress(NovaSandboxError):
                await asyncio.to_thread(kill_sandbox, name.removesuffix(".json"))
            log.error(
                "a damaged sandbox record was removed and its sandbox reaped",
                extra={"fields": {"file": name}},
            )
        adopted: builtins.list[str] = []
        reaped: builtins.list[str] = []
        # a warm pool's idle sandboxes: nobody's, and the pools refill after this
        for record in [r for r in records if r.pooled]:
            if _owner_alive(record.id):  # another live server's pool: not ours
                continue
            with contextlib.suppress(NovaSandboxError):  # SandboxNotFound: gone already
                await asyncio.to_thread(kill_sandbox, record.id)
            self.store.forget_sandbox(record.id)
            reaped.append(record.id)
            log.info(
                "pooled sandbox of the last run reaped", extra={"fields": {"sandbox": record.id}}
            )
        records = [r for r in records if not r.pooled]
        results = await asyncio.gather(
            *(AsyncSandbox.adopt(r.id) for r in records), return_exceptions=True
        )
        for record, result in zip(records, results, strict=True):
            fields: dict[str, Any] = {"sandbox": record.id, "key": record.owner}
            if isinstance(result, AsyncSandbox):
                owned = Owned(result, record.owner, record.labels, record.created_at)
                self._owned[record.id] = owned
                adopted.append(record.id)
                log.info(
                    "sandbox adopted",
                    extra={"fields": {**fields, "expires_at": result.deadline}},
                )
                continue
            if isinstance(result, SandboxOwned) and _owner_alive(record.id):
                # another live process owns it (a second server on this state
                # directory?): not ours to kill; tried again at the next start
                log.error(
                    "sandbox not adopted: another process owns it",
                    extra={"fields": {**fields, "error": result.message}},
                )
                continue
            if not isinstance(result, Exception):
                raise result
            if not isinstance(result, SandboxNotFound):  # there but unusable: kill it
                with contextlib.suppress(NovaSandboxError):
                    await asyncio.to_thread(kill_sandbox, record.id)
            self.store.forget_sandbox(record.id)
            reaped.append(record.id)
            log.warning(
                "sandbox reaped: it could not be adopted",
                extra={"fields": {**fields, "reason": str(result)}},
            )
        if records or reaped:
            log.info(
                "adopted the sandboxes of the last run",
                extra={"fields": {"adopted": len(adopted), "reaped": len(reaped)}},
            )
        return adopted, reaped

    async def snapshot(self, owner: str, sandbox_id: str) -> Snapshot:
        """Save ``owner``'s sandbox as a snapshot that belongs to ``owner``."""
        sb = self.get(owner, sandbox_id).live()
        snap = await sb.snapshot()
        if self.store is not None:
            self.store.save_snapshot(SnapshotRecord(snap.id, owner, snap.created_at, sb.id))
        log.info(
            "snapshot saved",
            extra={"fields": {"sandbox": sandbox_id, "snapshot": snap.id, "key": owner}},
        )
        return snap

    def get_snapshot(self, owner: str, snapshot_id: str) -> Snapshot:
        """``owner``'s snapshot; ``SnapshotNotFound`` whether it does not exist or is
        someone else's (the same message)."""
        record = self.store.snapshot(snapshot_id) if self.store is not None else None
        if record is None or record.owner != owner:
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}")
        try:
            return get_snapshot(snapshot_id)
        except SnapshotNotFound:
            if self.store is not None:
                self.store.forget_snapshot(snapshot_id)  # its files went (gc, by hand)
            raise SnapshotNotFound(f"no snapshot {snapshot_id!r}") from None

    def snapshots(self, owner: str) -> builtins.list[Snapshot]:
        if self.store is None:
            return []
        found = []
        for record in self.store.snapshots():
            if record.owner == owner:
                with contextlib.suppress(SnapshotNotFound):
                    found.append(self.get_snapshot(owner, record.id))
        return found

    def delete_snapshot(self, owner: str, snapshot_id: str) -> None:
        snap = self.get_snapshot(owner, snapshot_id)
        delete_snapshot(snap)
        if self.store is not None:
            self.store.forget_snapshot(snapshot_id)
        log.info("snapshot deleted", extra={"fields": {"snapshot": snapshot_id, "key": owner}})

    async def fork(
        self, owner: str, sandbox_id: str, n: int, labels: Mapping[str, str] | None
    ) -> builtins.list[Owned]:
        """``n`` new sandboxes of ``owner`` continuing from its sandbox ``sandbox_id``
        (labels: the parent's unless given)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        parent = self.get(owner, sandbox_id)
        children = await parent.live().fork(n)
        if self._closing:
            await asyncio.gather(*(c.kill() for c in children), return_exceptions=True)
            raise ShuttingDown("the server is shutting down: the forks were killed")
        kept = parent.labels if labels is None else labels
        made = [self._own(child, owner, kept) for child in children]
        log.info(
            "sandbox forked",
            extra={"fields": {"sandbox": sandbox_id, "key": owner, "forks": [o.id for o in made]}},
        )
        return made


__all__ = ["ENDED_KEPT", "Owned", "Registry", "ShuttingDown"]
