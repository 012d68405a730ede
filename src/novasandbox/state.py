"""Per-sandbox state on disk: ``<state dir>/sandboxes/<id>/record.json`` beside the VM's
sockets, console log and overlay. Records let any process list live sandboxes of this
host, kill one by id, and reap what outlived its lifetime or its owner (``reap``),
always checking a process's identity (pid + start time + command line) before
signalling it, so a reused pid is never killed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import AmbiguousSandboxId, SandboxNotFound
from .network import NetworkLog
from .paths import state_dir
from .providers import cgroups, egress, refusals, tap
from .providers.base import VMPaths
from .providers.qemu import process_start_time

RECORD = "record.json"


def sandboxes_dir(root: Path | None = None) -> Path:
    return (root or state_dir()) / "sandboxes"


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(5)


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """A lightweight description of a sandbox, as ``Sandbox.list()`` returns it."""

    id: str
    template: str
    state: str
    pid: int | None
    pid_start_time: int | None
    owner_pid: int
    created_at: float
    vcpus: int
    memory_mib: int
    accel: str
    state_dir: str
    source_snapshot: str | None = None
    owner_start_time: int | None = None
    deadline: float | None = None
    """When the sandbox's lifetime ends (epoch seconds); None: no limit."""
    vmm_uid: int | None = None
    """The unprivileged uid its VMM runs as (None: the VMM runs as its owner)."""
    network: str = "none"
    ports: dict[str, int] = field(default_factory=dict)
    """Exposed guest TCP port (as a string) -> port on the host's 127.0.0.1 ("nat")."""
    tap: str | None = None
    """The TAP it leases ("tap")."""
    cold_reason: str | None = None
    """Why it booted cold instead of restoring a snapshot (None: restored)."""
    refused: int = 0
    """Connections its egress policy refused so far (updated within a second or so;
    ``novasandbox network-log`` lists them)."""

    @property
    def restored(self) -> bool:
        """Whether it was restored from a snapshot (``source_snapshot``) or booted cold."""
        return self.source_snapshot is not None

    @property
    def owner_alive(self) -> bool:
        """Whether the process that created the sandbox still runs (same pid, same start)."""
        start = process_start_time(self.owner_pid)
        return start is not None and (
            self.owner_start_time is None or start == self.owner_start_time
        )

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def alive(self) -> bool:
        """Whether the VMM process recorded for this sandbox is still that process."""
        return self.pid is not None and _same_process(self.pid, self.pid_start_time, self.id)

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.created_at)

    @property
    def orphaned(self) -> bool:
        """The VM runs but the process that owned it is gone: nothing can use it any more,
        and the next ``gc`` (or ``create``) reaps it."""
        return self.alive and not self.owner_alive

    @property
    def status(self) -> str:
        """What ``novasandbox ls`` shows: the recorded state, or ``orphaned``."""
        return "orphaned" if self.orphaned else self.state

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "alive": self.alive,
            "orphaned": self.orphaned,
            "restored": self.restored,
        }


def _same_process(pid: int, start_time: int | None, sandbox_id: str) -> bool:
    if start_time is None or process_start_time(pid) != start_time:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"novasandbox-{sandbox_id}".encode() in cmdline


def write_record(directory: Path, info: SandboxInfo) -> None:
    """Write atomically; a directory that another process removed (kill, gc) is left gone."""
    tmp = directory / (RECORD + ".tmp")
    try:
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(directory / RECORD)
    except FileNotFoundError:
        pass


def read_record(directory: Path) -> SandboxInfo | None:
    try:
        data = json.loads((directory / RECORD).read_text())
        return SandboxInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def list_sandboxes(root: Path | None = None) -> list[SandboxInfo]:
    base = sandboxes_dir(root)
    if not base.is_dir():
        return []
    infos = [info for d in sorted(base.iterdir()) if (info := read_record(d)) is not None]
    return sorted(infos, key=lambda i: i.created_at)


def read_network_log(sandbox_id: str, root: Path | None = None) -> NetworkLog:
    """What a live sandbox's egress policy refused, from any process: the count its owner
    last recorded and the entries it wrote (``providers/refusals.py``)."""
    directory = sandboxes_dir(root) / sandbox_id
    info = read_record(directory) if sandbox_id and "/" not in sandbox_id else None
    if info is None:
        raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
    entries = refusals.read_entries(VMPaths(directory).network_log)
    return NetworkLog(max(info.refused, len(entries)), tuple(entries))


def resolve_sandbox_id(prefix: str, root: Path | None = None) -> str:
    """The id of the one sandbox whose id starts with ``prefix`` (``sb-6267``, or just
    ``6267``), as docker takes container ids. An exact id always wins."""
    if not isinstance(prefix, str) or not prefix or not _ID_PREFIX.fullmatch(prefix):
        raise SandboxNotFound(f"no sandbox with id {prefix!r}")
    base = sandboxes_dir(root)
    names = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    if prefix in names:
        return prefix
    wanted = prefix if prefix.startswith("sb-") else "sb-" + prefix
    matches = [n for n in names if n.startswith(wanted)]
    if not matches:
        raise SandboxNotFound(f"no sandbox with an id starting with {prefix!r}")
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise AmbiguousSandboxId(
            f"{prefix!r} matches {len(matches)} sandboxes ({shown}): give more of the id"
        )
    return matches[0]


_ID_PREFIX = re.compile(r"^[a-z0-9-]{1,64}$")


def remove_state(directory: Path) -> None:
    """Remove a sandbox's directory. Retried: a record being written into it at the same
    moment (another thread noticing the VM's end) can make one pass miss a file."""
    for _ in range(5):
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists():
            return
        time.sleep(0.01)


def kill_sandbox(sandbox_id: str, root: Path | None = None, timeout: float = 5.0) -> None:
    """Kill a sandbox by id from any process: SIGKILL its VMM (after checking that the pid
    is still that VMM), then remove its state directory."""
    directory = sandboxes_dir(root) / sandbox_id
    if not sandbox_id or "/" in sandbox_id or not directory.is_dir():
        raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
    info = read_record(directory)
    if info is not None and info.pid is not None and info.alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        _wait_gone(info, timeout)
    if info is not None:
        release_host_resources(info)
    remove_state(directory)


def reap(root: Path | None = None) -> list[str]:
    """Kill and remove what no one will clean up: sandboxes past their lifetime, and
    those whose owner process is gone (SIGKILLed mid-create or mid-run), with their
    overlays, sockets and logs. Returns the ids reaped. Safe to run from any process
    at any time; it is what ``novasandbox gc`` does and ``create`` runs it first."""
    return _reap(root)[0]


def reap_then_vmm_uids(root: Path | None = None) -> set[int]:
    """``reap``, then the uids the VMMs of the sandboxes left run as (or are about to):
    what ``create`` needs, from the one pass over the records."""
    return {i.vmm_uid for i in _reap(root)[1] if i.vmm_uid is not None}


def _reap(root: Path | None) -> tuple[list[str], list[SandboxInfo]]:
    """The ids reaped, and the records of the sandboxes left."""
    base = sandboxes_dir(root)
    if not base.is_dir():
        return [], []
    reaped: list[str] = []
    kept: list[SandboxInfo] = []
    for directory in base.iterdir():
        if not directory.is_dir():
            continue
        info = read_record(directory)
        if info is None:
            # a half-written entry: reap it only once it is clearly abandoned
            try:
                age = time.time() - directory.stat().st_mtime
            except OSError:
                continue
            if age > 60:
                remove_state(directory)
                reaped.append(directory.name)
            continue
        # A crashed VM of a live owner is left alone: its owner reads the console log.
        if info.owner_alive and not info.expired:
            kept.append(info)
            continue
        if info.pid is not None and info.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGKILL)
            _wait_gone(info)
        release_host_resources(info)
        remove_state(directory)
        reaped.append(info.id)
    # control groups whose VMM someone else killed (or whose owner died mid-create)
    cgroups.sweep(lambda name: (base / name).exists())
    if reaped:
        # forks' snapshots whose sandboxes were just reaped
        from .snapshots import drop_unused_fork_snapshot, list_snapshots

        for snap in list_snapshots(include_ephemeral=True):
            if snap.ephemeral:
                drop_unused_fork_snapshot(snap)
    return reaped, kept


def release_host_resources(info: SandboxInfo) -> None:
    """What a dead VMM held outside its state directory: its control group and its
    egress policy."""
    cgroups.remove_group(info.id)
    if info.network == "nat" and info.vmm_uid is not None:
        egress.remove(info.id, info.vmm_uid)
    if info.network == "tap" and info.tap is not None:
        index = tap.tap_index(info.tap)
        if index is not None:
            egress.remove(info.id, info.tap, tap.table())
            tap.give_back(tap.Tap(index), info.id)


def _wait_gone(info: SandboxInfo, timeout: float = 5.0) -> None:
    assert info.pid is not None
    deadline = time.monotonic() + timeout
    while _same_process(info.pid, info.pid_start_time, info.id) and time.monotonic() < deadline:
        time.sleep(0.01)


def running_vmm_uids() -> set[int]:
    """The uids that running QEMU processes (of any state directory) have."""
    uids = set()
    for pid in vmm_pids_under(None):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uids.add(int(line.split()[1]))
    return uids


def sweep_host_resources() -> dict[str, list[str]]:
    """What ``reap`` does not look for on every create: egress policies whose VMM is gone.
    (Control groups are swept by ``reap``.) Used by ``novasandbox gc``."""
    return {
        "egress_policies": egress.sweep(running_vmm_uids()),
        "taps": tap.sweep(_owner_alive),
    }


def _owner_alive(pid: int, start_time: int | None) -> bool:
    start = process_start_time(pid)
    return start is not None and (start_time is None or start == start_time)


def vmm_pids_under(root: Path | None) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions ``root`` (a state
    directory; None: any): how tests and the soak script check that nothing outlived
    them."""
    needle = str(root).encode() if root is not None else b""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and needle in cmdline:
            pids.append(int(entry.name))
    return pids
