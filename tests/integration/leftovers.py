"""What a test's own sandboxes left on the host, judged by their ids.

Other processes of the host may run sandboxes while the tests run (another test session,
a program of a user): their control groups, egress policies, TAP leases and QEMU
processes are none of the tests' business, and a check that looked at every NovaSandbox
resource of the host failed because of them (an empty group is normal for a moment while
another process creates or kills a sandbox). So a test names the sandboxes it judges:

- ``SandboxIds`` learns the id of every sandbox made with the test session's private
  state directory, by any process (the CLI run as a subprocess too): a sandbox's first
  act is to make ``<state dir>/sandboxes/<id>``, and inotify reports each such directory,
  however short-lived (the kernel queues the events until they are read).
- ``leftovers_of`` lists what sandboxes of given ids left: their state directory, a QEMU
  process whose command line names that directory, their control group, their egress
  policy (the host's "nat" table and the current TAP namespace's table) and their TAP
  lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from novasandbox.gc import vmm_pids_under
from novasandbox.host import cgroups, egress, tap

_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_IN_ONLYDIR = 0x01000000
_IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")  # struct inotify_event without its name


class SandboxIds:
    """The ids of the sandboxes made under the state directory ``root`` since this was
    created, in the order they were made (by any process)."""

    def __init__(self, root: Path) -> None:
        self.directory = root / "sandboxes"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seen: list[str] = []
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
        if libc.inotify_add_watch(self._fd, str(self.directory).encode(), mask) < 0:
            errno = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(errno, f"inotify_add_watch {self.directory}")

    def mark(self) -> int:
        """A position: ``since(mark)`` gives the ids made after it."""
        return len(self.all())

    def since(self, mark: int) -> list[str]:
        return self.all()[mark:]

    def all(self) -> list[str]:
        self._read()
        return list(self._seen)

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode()
                offset = start + length
                if mask & _IN_Q_OVERFLOW:
                    raise AssertionError(f"inotify dropped events of {self.directory}")
                if mask & _IN_IGNORED:
                    raise AssertionError(f"{self.directory} went away: no id is seen any more")
                if mask & _IN_ISDIR and name:
                    self._seen.append(name)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _policy_tables() -> list[egress.PolicyTable]:
    """The tables a sandbox's egress policy may be in: the host's ("nat"), and the TAP
    table of the namespace the tests use now (``NOVASANDBOX_NETNS``, or the host's)."""
    return [egress.UID_TABLE, tap.table()] if os.geteuid() == 0 else []


def leftovers_of(root: Path, ids: Iterable[str]) -> list[str]:
    """What the sandboxes ``ids``, made with the state directory ``root``, left behind
    (empty: nothing). Looks at nothing of any other sandbox."""
    ids = sorted(set(ids))
    if not ids:
        return []
    found = []
    sandboxes = root / "sandboxes"
    found += [f"state directory {sandboxes / i}" for i in ids if (sandboxes / i).exists()]
    for pid in vmm_pids_under(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found += [f"QEMU pid {pid} of {i}" for i in ids if f"{sandboxes / i}/".encode() in cmdline]
    found += [f"control group {g}" for g in cgroups.groups_of(ids)]
    chains = {egress.chain_name(i): i for i in ids}
    for table in _policy_tables():
        for chain in egress.installed(table):
            if chain in chains:
                found.append(f"egress policy {chain} of {chains[chain]} in {table.name}")
    if os.geteuid() == 0:
        found += [f"TAP {t.name} leased to {h}" for t, h in tap.leases() if h in ids]
    return found


def check_no_leftovers(root: Path, ids: Iterable[str]) -> None:
    """Fail (AssertionError) if the sandboxes ``ids`` left anything behind."""
    ids = sorted(set(ids))
    found = leftovers_of(root, ids)
    assert found == [], f"sandboxes {ids} left behind: {found}"
