"""What one sandbox's egress policy refused, as its owner process hears of it.

Refusals come from the seccomp guard's decisions (no root: every one of them) or from
the kernel's NFLOG messages (root: rate-limited by the kernel, and counted exactly by
the chain's counters, ``egress.refused_count``). For each one, ``Refusals``:

- logs a WARNING on ``novasandbox.network`` (``sandbox sb-…: refused tcp
  203.0.113.80:443 (rule: non-public range 203.0.113.0/24)``), at most ``RATE`` a second
  after a burst of ``BURST`` per sandbox: a guest hammering refused destinations cannot
  flood its owner's log; what goes unlogged is counted and said in one line later;
- keeps the last ``NetworkLog.MAX_ENTRIES`` logged ones in memory;
- appends them, in batches, to ``network.jsonl`` in the sandbox's state directory (kept
  to at most twice ``MAX_ENTRIES`` lines), for other processes (``novasandbox
  network-log``), and has the sandbox's record updated with the exact count
  (``on_change``), at most every ``FLUSH_DELAY`` seconds.

Everything runs on the sandbox's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..network import NetworkLog, RefusedConnection, describe_refusal
from .nflog import BURST, RATE_PER_SECOND

log = logging.getLogger("novasandbox.network")

RATE = float(RATE_PER_SECOND)
"""Log lines a second per sandbox after a burst of ``BURST``: the kernel's limit on
what it logs, applied again here (the guard hears every refusal)."""
FLUSH_DELAY = 0.25


class Refusals:
    """The refusals of one sandbox."""

    def __init__(
        self,
        sandbox_id: str,
        path: Path,
        count: Callable[[], int | None] | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.path = path
        self._count = count
        """Reads the exact count (the kernel's counters); None: every refusal is heard."""
        self.heard = 0
        """Refusals this process heard of (all of them, without ``count``)."""
        self.total = 0
        """Every refusal so far, as last known (``refresh`` brings it up to date)."""
        self.unlogged = 0
        """Refusals counted but not logged: dropped by our rate limit, or (as root) by the
        kernel's, which the counters reveal."""
        self._logged = 0
        self.entries: deque[RefusedConnection] = deque(maxlen=NetworkLog.MAX_ENTRIES)
        self.on_change: Callable[[], None] | None = None
        """Called (on the loop) when ``total`` changed: the sandbox rewrites its record."""
        self._pending: list[RefusedConnection] = []
        self._lines = 0
        self._tokens = float(BURST)
        self._refilled = time.monotonic()
        self._reported_unlogged = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def refused(self, protocol: str, address: str, port: int | None, code: str) -> None:
        """One refusal (on the sandbox's event loop)."""
        if self._closed:
            return
        self.heard += 1
        if self._count is None:
            self.total = self.heard
        if self._take_token():
            entry = RefusedConnection(
                time.time(), protocol, address, port, describe_refusal(code, address)
            )
            self.entries.append(entry)
            self._pending.append(entry)
            self._logged += 1
            log.warning(
                "sandbox %s: refused %s (rule: %s)", self.sandbox_id, entry.destination, entry.rule
            )
        else:
            self.unlogged += 1
        self._schedule()

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._refilled) * RATE)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _schedule(self) -> None:
        if self._timer is not None or self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loop = loop
        self._timer = loop.call_later(FLUSH_DELAY, self._start_flush, loop)

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._closed:
            self._task = loop.create_task(self._flush())

    async def refresh(self) -> NetworkLog:
        """The log, its count read now (the kernel's counters, where they count)."""
        if self._count is not None and not self._closed:
            count = await asyncio.to_thread(self._count)
            if count is not None:
                self.total = max(count, self.heard)
        return self.snapshot()

    def snapshot(self) -> NetworkLog:
        return NetworkLog(max(self.total, self.heard), tuple(self.entries))

    async def _flush(self) -> None:
        before = self.total
        try:
            await self.refresh()
            self._write()
            # as root the kernel's limit drops log messages we never hear of: its counters
            # tell how many
            self.unlogged = max(self.unlogged, self.total - self._logged)
            if self.unlogged > self._reported_unlogged:
                log.warning(
                    "sandbox %s: %d more refused connections were not logged (rate limit); "
                    "%d refused in all",
                    self.sandbox_id,
                    self.unlogged - self._reported_unlogged,
                    self.total,
                )
                self._reported_unlogged = self.unlogged
            if self.on_change is not None and not self._closed:
                self.on_change()
        finally:
            self._task = None
        # the kernel logs a flood only in part: look again until its counters settle
        if self._count is not None and self.total != before:
            self._schedule()

    def _write(self) -> None:
        """Append what is pending to the file; past twice the limit, keep the newest."""
        if not self._pending or self._closed:
            return
        pending, self._pending = self._pending, []
        try:
            if self._lines + len(pending) > 2 * NetworkLog.MAX_ENTRIES:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(_line(e) for e in self.entries))
                tmp.replace(self.path)
                self._lines = len(self.entries)
            else:
                with open(self.path, "a") as f:
                    f.write("".join(_line(e) for e in pending))
                self._lines += len(pending)
        except OSError:
            pass  # the sandbox's directory is going (kill)

    def close(self) -> None:
        """Hear nothing more; from any thread (a VM is released from a worker thread)."""
        self._closed = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._cancel()
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _line(entry: RefusedConnection) -> str:
    return json.dumps(entry.to_json(), separators=(",", ":")) + "\n"


MAX_READ = 4 * 2 * NetworkLog.MAX_ENTRIES * 256
"""The most of a log file that is read (bytes): it is written by the owner, but bounded
anyway."""


def read_entries(path: Path) -> list[RefusedConnection]:
    """The entries of a sandbox's ``network.jsonl`` (the newest ``MAX_ENTRIES``); lines
    that are not entries are skipped."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - MAX_READ))
            data = f.read(MAX_READ)
    except OSError:
        return []
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = RefusedConnection.from_json(json.loads(line))
            if entry is not None:
                out.append(entry)
    return out[-NetworkLog.MAX_ENTRIES :]
