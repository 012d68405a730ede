"""What is on disk about a sandbox: ``<state dir>/sandboxes/<id>/record.json`` beside the
VM's sockets, console log and overlay. Records let any process list the sandboxes of
this host, find one by id, and release what a dead one held (``release_record``),
always checking a process's identity (pid + start time + command line) before
signalling it, so a reused pid is never killed. What to reap and when is ``gc.py``'s."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import AmbiguousSandboxId, SandboxNotFound
from .host import cgroups, refusals
from .host.plan import Confinement, Enforcement, HostPlan
from .host.resources import release
from .network import NetworkLog
from .paths import state_dir
from .procfs import process_alive, same_process

RECORD = "record.json"
NETWORK_LOG = "network.jsonl"
"""The refusals of a sandbox's egress policy, one JSON object a line (``refusals.py``)."""


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
    plan: dict[str, Any] | None = None
    """What it holds on the host, as decided at create (``HostPlan``; see ``host_plan``)."""
    provider: str = "qemu"
    """The provider that runs its VM."""
    config: dict[str, Any] | None = None
    """Its machine config (``MachineConfig.to_json``): what another process needs to
    adopt it."""
    adoptable: bool = False
    """Its owner may die and another process adopt it (``AsyncSandbox.adopt``): until its
    lifetime ends it is not reaped for its owner being gone, only once its VM is."""
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
    def host_plan(self) -> HostPlan:
        """What it holds on the host. A record written before plans were recorded gets
        one rebuilt from its old fields (enough to release what it held)."""
        if self.plan is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return HostPlan.from_json(self.plan)
        return HostPlan(self.id, "none", Enforcement.NOTHING, False, None)

    @property
    def vmm_uid(self) -> int | None:
        """The unprivileged uid its VMM runs as (None: the VMM runs as its owner)."""
        return self.host_plan.vmm_uid

    @property
    def network(self) -> str:
        return self.host_plan.network

    @property
    def ports(self) -> dict[str, int]:
        """Exposed guest TCP port (as a string) -> port on the host's 127.0.0.1 ("nat")."""
        return {str(g): h for g, h in self.host_plan.host_ports.items()}

    @property
    def owner_alive(self) -> bool:
        """Whether the process that created the sandbox still runs (same pid, same start)."""
        return process_alive(self.owner_pid, self.owner_start_time)

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def alive(self) -> bool:
        """Whether the VMM process recorded for this sandbox is still that process."""
        return self.pid is not None and same_process(
            self.pid, self.pid_start_time, vmm_marker(self.id)
        )

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.created_at)

    @property
    def orphaned(self) -> bool:
        """The VM runs but the process that owned it is gone: nothing can use it any more
        (unless it is ``adoptable``), and the next ``gc`` (or ``create``) reaps it."""
        return self.alive and not self.owner_alive

    @property
    def abandoned(self) -> bool:
        """Nobody will release it: past its lifetime, or its owner is gone (and, for an
        adoptable one, its VM too). What ``gc`` reaps."""
        if self.expired:
            return True
        if self.owner_alive:
            return False
        return not (self.adoptable and self.alive)

    @property
    def status(self) -> str:
        """What ``novasandbox ls`` shows: the recorded state, or ``orphaned``."""
        if self.orphaned:
            return "adoptable" if self.adoptable else "orphaned"
        return self.state

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "alive": self.alive,
            "vmm_uid": self.vmm_uid,
            "network": self.network,
            "ports": self.ports,
            "orphaned": self.orphaned,
            "restored": self.restored,
        }


def vmm_marker(sandbox_id: str) -> bytes:
    """What the command line of a sandbox's VMM process contains (every provider names
    its process so): with the pid and start time, how its identity is checked."""
    return f"novasandbox-{sandbox_id}".encode()


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
        if isinstance(data, dict) and "plan" not in data:
            data = _from_old_record(data)
        return SandboxInfo(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _from_old_record(data: dict[str, Any]) -> dict[str, Any]:
    """A record of the version before host plans: its network fields become a plan."""
    data = dict(data)
    network = str(data.pop("network", "none"))
    uid = data.pop("vmm_uid", None)
    ports = data.pop("ports", {}) or {}
    confine = Confinement(int(uid), int(uid)) if uid is not None else None
    if network == "tap":
        enforcement = Enforcement.NFT_TAP
    elif network == "nat":
        enforcement = Enforcement.NFT_UID if confine is not None else Enforcement.GUARD
    else:
        enforcement = Enforcement.NOTHING
    host_ports = {int(g): int(h) for g, h in ports.items()}
    plan = HostPlan(str(data["id"]), network, enforcement, True, None, host_ports, confine)
    data["plan"] = plan.to_json()
    return data


def list_sandboxes(root: Path | None = None) -> list[SandboxInfo]:
    base = sandboxes_dir(root)
    if not base.is_dir():
        return []
    infos = [info for d in sorted(base.iterdir()) if (info := read_record(d)) is not None]
    return sorted(infos, key=lambda i: i.created_at)


def read_network_log(sandbox_id: str, root: Path | None = None) -> NetworkLog:
    """What a live sandbox's egress policy refused, from any process: the count its owner
    last recorded and the entries it wrote (``host/refusals.py``)."""
    directory = sandboxes_dir(root) / sandbox_id
    info = read_record(directory) if sandbox_id and "/" not in sandbox_id else None
    if info is None:
        raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
    entries = refusals.read_entries(directory / NETWORK_LOG)
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


def release_record(info: SandboxInfo, directory: Path, timeout: float = 5.0) -> None:
    """Release a sandbox that no process will release: SIGKILL its VMM (after checking
    that the pid is still that VMM), give back what it held on the host (``release``,
    the same path ``kill`` takes) and remove its state directory."""
    if info.pid is not None and info.alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while info.alive and time.monotonic() < deadline:
            time.sleep(0.01)
    release(info.host_plan, info.tap)
    remove_state(directory)


def release_abandoned(root: Path | None = None) -> tuple[list[str], list[SandboxInfo]]:
    """Release what no one will: sandboxes past their lifetime, and those whose owner
    process is gone (SIGKILLed mid-create or mid-run), with their overlays, sockets and
    logs; then the control groups whose VMM someone else killed. Returns the ids
    released and the records of the sandboxes left. ``create`` runs it first;
    ``gc.reap`` is it plus the snapshots of forks that were released."""
    base = sandboxes_dir(root)
    if not base.is_dir():
        return [], []
    released: list[str] = []
    kept: list[SandboxInfo] = []
    for directory in base.iterdir():
        if not directory.is_dir():
            continue
        info = read_record(directory)
        if info is None:
            # a half-written entry: remove it only once it is clearly abandoned
            try:
                age = time.time() - directory.stat().st_mtime
            except OSError:
                continue
            if age > 60:
                remove_state(directory)
                released.append(directory.name)
            continue
        # A crashed VM of a live owner is left alone: its owner reads the console log.
        if not info.abandoned:
            kept.append(info)
            continue
        release_record(info, directory)
        released.append(info.id)
    cgroups.sweep(lambda name: (base / name).exists())
    return released, kept
