"""The server's warm pools (``novasandbox serve --pool TEMPLATE=N``): N sandboxes of a
template restored ahead of time and handed to whichever key creates one first.

A create is served from the pool of its template when it asks for nothing a pooled
sandbox was not made with (``poolable``): the template's own shape (``vcpus`` and
``memory_mib`` absent or the template's), no environment, no network (``network``
``"none"``, no ``allow``, no ``ports``), not ``cold``. Labels and the lifetime
(``timeout``) may be anything: they are set on the pooled sandbox as on a fresh one (the
lifetime counts from the hand-over). Any other create, or one that finds no ready
sandbox in the pool, is an ordinary create (it does not wait for the pool to refill).
A pool starts refilling ``REFILL_DELAY`` after a hand-over.

Each pool is an ``AsyncPool``: it refills in the background, replaces a pooled sandbox
that died while waiting, and ``close`` (the server's stop) kills what it still holds.

With the server's ``OwnerStore`` each pooled sandbox is recorded as ``pooled`` (no
owner) as soon as it exists; the hand-over rewrites the record with its owner
(``Registry._own``), ``close`` removes the records of those it killed. A server killed
without its stop (SIGKILL, a crash) leaves the records of its idle pooled sandboxes,
which the next start reaps (``Registry.adopt_all``) before it fills its pools anew.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, NovaSandboxError, check_int
from ..pool import AsyncPool
from ..sandbox import AsyncSandbox
from ..templates import TemplateManager
from .owners import OwnerStore, SandboxRecord

log = logging.getLogger("novasandbox.server")

MAX_POOL = 64
"""Largest warm pool of one template."""
REFILL_DELAY = 1.0
"""Seconds a pool waits after handing a sandbox over before it restores the next: the
new owner's first command (``novasandbox run``'s only one) then has the CPUs to itself,
not shared with a restore and its warm-up."""
_SPEC = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)=([0-9]+)")


def parse_pool_specs(specs: list[str] | tuple[str, ...], option: str = "--pool") -> dict[str, int]:
    """``TEMPLATE=N`` strings (``--pool``, ``--prestart``) as {template: N};
    ``ConfigError`` for a bad one or a template given twice."""
    sizes: dict[str, int] = {}
    for spec in specs:
        m = _SPEC.fullmatch(spec)
        if m is None:
            raise ConfigError(f"{option} takes TEMPLATE=N (e.g. python=2), got {spec!r}")
        name, count = m.group(1), int(m.group(2))
        if name in sizes:
            raise ConfigError(f"{option} {name} is given twice")
        sizes[name] = check_int(f"{option} {name}", count, 1, MAX_POOL)
    return sizes


class WarmPools:
    """One ``AsyncPool`` per template of ``sizes`` ({template: N}). Made before the
    server listens (a template that is not built fails there); ``start`` fills them.
    ``adoptable``: the pooled sandboxes are made adoptable (when the server's sandboxes
    outlive it, a pooled one handed over must too). ``store``: where the pooled sandboxes
    are recorded until their hand-over (see the module's description)."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        provider: str | None = None,
        templates: TemplateManager | None = None,
        adoptable: bool = False,
        store: OwnerStore | None = None,
        prestart: Mapping[str, int] | None = None,
    ) -> None:
        self._prestart = dict(prestart or {})
        """{template: N} VMMs started ahead (``serve --prestart``, ``AsyncSandbox.prestart``)."""
        self._provider = provider
        self._templates = templates
        self._pools: dict[str, AsyncPool] = {}
        self._store = store
        self._recorded: set[str] = set()
        """The ids recorded as pooled and not handed over."""
        self._shapes: dict[str, tuple[int, int]] = {}
        manager = templates or TemplateManager() if sizes or prestart else None
        for name in self._prestart:
            assert manager is not None
            manager.require_built(name)  # a template that is not built fails here
        for name, size in sizes.items():
            assert manager is not None
            tpl = manager.get(name)
            self._shapes[name] = (tpl.vcpus, tpl.memory_mib)
            pool = AsyncPool(name, size, timeout=None, templates=manager, provider=provider)
            pool._refill_delay = REFILL_DELAY
            pool._adoptable = adoptable  # as the server's other sandboxes
            pool._on_made = self._made
            self._pools[name] = pool

    def _made(self, sb: AsyncSandbox) -> None:
        if self._store is not None:
            self._store.save_sandbox(SandboxRecord(sb.id, "", {}, time.time(), pooled=True))
            self._recorded.add(sb.id)

    def __bool__(self) -> bool:
        return bool(self._pools)

    async def start(self) -> None:
        for name, pool in self._pools.items():
            await pool.start()
            log.info("warm pool filling", extra={"fields": {"template": name, "size": pool.size}})
        for name, count in self._prestart.items():
            started = await AsyncSandbox.prestart(
                name, count, templates=self._templates, provider=self._provider
            )
            log.info("VMMs started ahead", extra={"fields": {"template": name, "count": started}})

    def ready(self) -> dict[str, int]:
        """Sandboxes ready per template."""
        return {name: pool.ready for name, pool in self._pools.items()}

    def poolable(self, arguments: Mapping[str, Any]) -> bool:
        """Whether a create with these ``AsyncSandbox.create`` arguments may be given a
        sandbox of the pool of its template (see the module's description)."""
        template = arguments.get("template", "python")
        if template not in self._pools:
            return False
        vcpus, memory = self._shapes[template]
        return (
            arguments.get("vcpus") in (None, vcpus)
            and arguments.get("memory_mib") in (None, memory)
            and not arguments.get("env")
            and arguments.get("network", "none") == "none"
            and arguments.get("allow") is None
            and not arguments.get("ports")
            and not arguments.get("cold", False)
        )

    async def take(self, arguments: Mapping[str, Any]) -> AsyncSandbox | None:
        """A ready pooled sandbox for this create (its lifetime set to the create's
        ``timeout`` from now), or None: make one the ordinary way."""
        if not self.poolable(arguments):
            return None
        pool = self._pools[arguments.get("template", "python")]
        if not pool.ready:
            return None
        try:
            sb = await pool._acquire(0, arguments.get("timeout"))
            self._recorded.discard(sb.id)  # its record is the new owner's now (_own)
            # the hand-over sets the lifetime in a task of its own: let its first (host)
            # part run, so that the create's answer shows the new expires_at
            await asyncio.sleep(0)
            return sb
        except ConfigError:
            raise  # a bad lifetime: the create's own error
        except NovaSandboxError as exc:  # none alive after all, or the pool closed: create
            log.info(
                "warm pool missed",
                extra={"fields": {"template": pool.template, "reason": str(exc)}},
            )
            return None

    async def close(self) -> None:
        """Stop refilling and kill every pooled sandbox and VMM started ahead. Idempotent."""
        for name in self._prestart:
            await AsyncSandbox.prestart(name, 0, provider=self._provider)
        for pool in self._pools.values():
            await pool.close()
        if self._store is not None:  # each one killed (or dead before)
            for sandbox_id in sorted(self._recorded):
                self._store.forget_sandbox(sandbox_id)
        self._recorded.clear()


__all__ = ["MAX_POOL", "WarmPools", "parse_pool_specs"]
