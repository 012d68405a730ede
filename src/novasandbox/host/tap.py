"""TAP networking for root deployments: a pool of pre-created TAP devices.

A "tap" sandbox's network device is backed by a TAP of the host instead of QEMU's
user-mode stack: the guest is a real host on a /30 of its own, routed and masqueraded by
the host kernel, and reachable from the host at its own address. Setting a TAP up (create
the device, address it, bring it up) costs a few ``ip`` calls, so devices are made ahead
of time by ``prepare(size)`` and each sandbox leases one; when none is free a fresh one is
made for the sandbox and removed with it.

- TAP ``i`` is ``nstap<i>`` with the /30 at ``10.201.0.0 + 4i``: the host side is ``.1``
  (the guest's gateway), the guest ``.2``.
- ``NOVASANDBOX_NETNS`` names a network namespace (``ip netns``) that holds the TAPs,
  their routes and the NAT rules; by default they are the host's. Forwarding
  (``net.ipv4.ip_forward``) is turned on in that namespace.
- Policies: ``egress.tap_table`` (forward and input hooks, keyed on the TAP), the same
  allow lists as "nat".
- State: ``/run/novasandbox/taps/<namespace or "host">/``: ``pool.json`` (its size and
  who prepared it: a pid and its start time, or nobody for ``novasandbox tap up``) and
  one ``<tap>.lease`` per sandbox using a TAP. ``release()`` (and ``gc`` once the
  preparing process is gone) removes the pool; ``gc`` ends leases whose TAP no process
  holds.

Only QEMU is given the TAP: NovaSandbox opens it (``TUNSETIFF``, from a thread that has
entered the namespace) and hands QEMU the descriptor.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from ..errors import NetworkError
from ..procfs import process_start_time
from . import egress
from .netns import in_netns

PREFIX = "nstap"
SUBNET = IPv4Network("10.201.0.0/16")
MAX_TAPS = SUBNET.num_addresses // 4
TUNSETIFF, TUNGETIFF = 0x400454CA, 0x800454D2
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_PERSIST = 0x0002, 0x1000, 0x4000, 0x0800


@dataclass(frozen=True, slots=True)
class Tap:
    index: int

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def network(self) -> IPv4Network:
        return IPv4Network((int(SUBNET.network_address) + 4 * self.index, 30))

    @property
    def host_address(self) -> IPv4Address:
        return self.network.network_address + 1

    @property
    def guest_address(self) -> IPv4Address:
        return self.network.network_address + 2


def tap_index(name: str) -> int | None:
    rest = name.removeprefix(PREFIX)
    return int(rest) if name.startswith(PREFIX) and rest.isdigit() else None


def netns() -> str | None:
    name = os.environ.get("NOVASANDBOX_NETNS", "").strip()
    if name and ("/" in name or name.startswith(".")):
        raise NetworkError(f"NOVASANDBOX_NETNS must be a name from 'ip netns', got {name!r}")
    return name or None


def table() -> egress.PolicyTable:
    return egress.tap_table(str(SUBNET), PREFIX, netns())


def _ip(*args: str) -> None:
    argv = ["ip", *args]
    done = egress.run_in(netns(), argv)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def existing() -> list[Tap]:
    """The TAP devices of the pool's kind present in the namespace."""
    done = egress.run_in(netns(), ["ip", "-o", "link", "show"])
    taps = []
    for line in done.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            index = tap_index(parts[1].strip().split("@")[0])
            if index is not None:
                taps.append(Tap(index))
    return sorted(taps, key=lambda t: t.index)


RUN_DIR = Path("/run/novasandbox/taps")
"""Where leases live: one directory per namespace, shared by every NovaSandbox process of
the host whatever its state directory (the TAPs are the host's), and on a tmpfs, gone at
reboot like the TAPs themselves."""
LEASE_GRACE_S = 60.0
"""A lease this young is kept by ``gc`` even if no VMM holds its TAP yet (a create may be
between leasing the TAP and starting QEMU)."""


def _state() -> Path:
    path = RUN_DIR / (netns() or "host")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def lease_path(tap: Tap) -> Path:
    return _state() / f"{tap.name}.lease"


def held() -> set[str]:
    """The TAPs some process has open (a tun descriptor whose fdinfo names its device):
    those in use, whichever state directory their sandbox was made with."""
    names = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != "/dev/net/tun":
                    continue
                info = (proc / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("iff:"):
                    names.add(line.split(":", 1)[1].strip())
    return names


@contextmanager
def _locked() -> Iterator[Path]:
    directory = _state()
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def _make(tap: Tap) -> None:
    _ip("tuntap", "add", "dev", tap.name, "mode", "tap", "vnet_hdr")
    try:
        _ip("addr", "add", f"{tap.host_address}/30", "dev", tap.name)
        _ip("link", "set", tap.name, "up")
    except NetworkError:
        _delete(tap)
        raise


def _delete(tap: Tap) -> None:
    egress.run_in(netns(), ["ip", "link", "del", tap.name])


def _forwarding() -> None:
    done = egress.run_in(netns(), ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
    if done.returncode != 0:
        raise NetworkError(f"cannot turn on IPv4 forwarding: {done.stderr.strip()}")


def prepare(size: int, owner: tuple[int, int | None] | None = None) -> list[Tap]:
    """Make sure ``size`` TAPs exist (creating the missing ones), with forwarding and the
    NAT table in place. ``owner`` (pid, start time) is the process whose end releases the
    pool at the next ``gc``; None: it stays until ``release()``."""
    if os.geteuid() != 0:
        raise NetworkError("TAP networking needs root")
    if not 0 <= size <= MAX_TAPS:
        raise NetworkError(f"a TAP pool holds 0 to {MAX_TAPS} devices, not {size}")
    with _locked() as directory:
        _forwarding()
        egress.ensure_table(table())
        present = {t.index for t in existing()}
        for index in range(size):
            if index not in present:
                _make(Tap(index))
        record = {"size": size, "owner": list(owner) if owner else None, "netns": netns()}
        (directory / "pool.json").write_text(json.dumps(record))
    return [Tap(i) for i in range(size)]


@contextmanager
def pool(size: int) -> Iterator[list[Tap]]:
    """``prepare(size)`` owned by this process, released when the block ends (and by
    ``gc`` if this process dies first): what a server does at start and shutdown."""
    taps = prepare(size, owner=(os.getpid(), process_start_time(os.getpid())))
    try:
        yield taps
    finally:
        release()


def _pool() -> dict[str, object] | None:
    try:
        data = json.loads((_state() / "pool.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def acquire(sandbox_id: str) -> tuple[Tap, bool]:
    """Lease a free TAP of the pool to ``sandbox_id``; without one, make a fresh TAP for
    it (removed on ``give_back``). Returns the TAP and whether it was fresh."""
    if os.geteuid() != 0:
        raise NetworkError("TAP networking needs root")
    with _locked() as directory:
        # the pool's TAPs are known from its record: no need to ask the kernel (an "ip"
        # call) on every create; open_tap checks that the device is really there
        pool = _pool()
        size = pool.get("size") if pool else 0
        pooled = [Tap(i) for i in range(size if isinstance(size, int) else 0)]
        free = next((t for t in pooled if not (directory / f"{t.name}.lease").exists()), None)
        present: list[Tap] = []
        if free is None:  # then any TAP of the kind that is there (a pool made elsewhere)
            present = existing()
            free = next((t for t in present if not (directory / f"{t.name}.lease").exists()), None)
        if free is not None:
            (directory / f"{free.name}.lease").write_text(
                json.dumps({"sandbox": sandbox_id, "fresh": False})
            )
            return free, False
        taken = {t.index for t in present}
        index = next(i for i in range(MAX_TAPS + 1) if i not in taken)
        if index >= MAX_TAPS:
            raise NetworkError("no TAP left in the address range")
        _forwarding()
        egress.ensure_table(table())
        tap = Tap(index)
        _make(tap)
        (directory / f"{tap.name}.lease").write_text(
            json.dumps({"sandbox": sandbox_id, "fresh": True})
        )
        return tap, True


def leases() -> list[tuple[Tap, str | None]]:
    """Each TAP present and the sandbox that leases it (None: free)."""
    directory = _state()
    out = []
    for t in existing():
        try:
            holder = str(json.loads((directory / f"{t.name}.lease").read_text())["sandbox"])
        except (OSError, ValueError, KeyError, TypeError):
            holder = None
        out.append((t, holder))
    return out


def give_back(tap: Tap, sandbox_id: str) -> None:
    """End ``sandbox_id``'s lease of ``tap``; a fresh TAP is removed, a pooled one is
    free again."""
    with _locked() as directory:
        lease = directory / f"{tap.name}.lease"
        try:
            data = json.loads(lease.read_text())
        except (OSError, ValueError):
            return
        if data.get("sandbox") != sandbox_id:
            return
        lease.unlink(missing_ok=True)
        if data.get("fresh"):
            _delete(tap)


def release() -> list[str]:
    """Remove the pool: every TAP no sandbox leases, and the NAT table once no TAP is
    left. Returns the TAPs removed."""
    removed = []
    with _locked() as directory:
        for tap in existing():
            if not (directory / f"{tap.name}.lease").exists():
                _delete(tap)
                removed.append(tap.name)
        (directory / "pool.json").unlink(missing_ok=True)
        if not existing():
            egress.run_in(netns(), [egress._nft(), "delete", "table", *table().name.split()])
    return removed


def sweep(owner_alive: Callable[[int, int | None], bool]) -> list[str]:
    """For ``gc``: end the leases whose TAP no process holds (their sandbox is gone), once
    older than ``LEASE_GRACE_S``, and release the pool when the process that prepared it
    is gone. Returns the TAPs removed."""
    if os.geteuid() != 0:
        return []
    removed = []
    in_use = held()
    now = time.time()
    with _locked() as directory:
        for lease in directory.glob(f"{PREFIX}*.lease"):
            name = lease.name.removesuffix(".lease")
            try:
                data = json.loads(lease.read_text())
                young = now - lease.stat().st_mtime < LEASE_GRACE_S
            except (OSError, ValueError):
                continue
            if name in in_use or young:
                continue
            lease.unlink(missing_ok=True)
            index = tap_index(name)
            if data.get("fresh") and index is not None:
                _delete(Tap(index))
                removed.append(name)
    pool = _pool()
    owner = pool.get("owner") if pool else None
    if isinstance(owner, list) and not owner_alive(int(owner[0]), owner[1]):
        removed += release()
    return removed


def open_tap(tap: Tap) -> int:
    """A descriptor attached to ``tap`` (in the pool's namespace) for QEMU to use."""

    def attach() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.name.encode(), flags))
            # TUNSETIFF makes a new device when the name is unknown: a TAP that
            # vanished (deleted by hand) must not come back unaddressed
            got = fcntl.ioctl(fd, TUNGETIFF, struct.pack("16sH", b"", 0))
            if not struct.unpack("16sH", got[:18])[1] & IFF_PERSIST:
                raise OSError(f"{tap.name} is not a prepared TAP (run: novasandbox tap up)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    try:
        return in_netns(netns(), attach)
    except OSError as exc:
        raise NetworkError(f"cannot attach to {tap.name}: {exc}") from exc
