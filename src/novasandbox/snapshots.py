"""Snapshots: a VM's memory and device state plus its disk exactly as it was, restorable
into any number of new sandboxes.

A snapshot is a directory with ``memory.bin`` (QEMU's migration stream), ``disk.qcow2``
(a copy of the VM's copy-on-write overlay, taken while the VM was paused; its backing
chain ends at the template image) and ``manifest.json``. Each restored sandbox gets its
own overlay on top of ``disk.qcow2``, which is never written again.

* Template snapshots are made by ``novasandbox template build`` (boot once, wait for the
  agent, quiesce, save) and live in the template cache, keyed by everything the saved
  state depends on (image, kernel, QEMU version, accelerator, vCPUs, memory).
* User snapshots come from ``sandbox.snapshot()`` and live in the state directory under
  ``snapshots/<id>``. Forks use the same mechanism with an ephemeral snapshot that is
  removed when the last sandbox restored from it is gone.

A snapshot restores only into the same machine: same vCPUs and memory, no extra drives,
same QEMU and accelerator; anything else raises ``SnapshotIncompatible``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError, SnapshotError, SnapshotIncompatible, SnapshotNotFound
from .network import DETACHED
from .paths import state_dir

if TYPE_CHECKING:
    from .agent_client import AgentClient
    from .providers.qemu import QemuVM
    from .templates import BuiltTemplate, TemplateManager

log = logging.getLogger("novasandbox.snapshots")

SNAPSHOT_RECIPE = "7"
"""Bump when what a template snapshot contains changes."""
MANIFEST = "manifest.json"
MEMORY = "memory.bin"
DISK = "disk.qcow2"
WARMUP_COMMANDS = (["/bin/true"], "echo warm | cat", ["python3", "-c", "import json, os, sys"])


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A saved VM (a frozen value; its files are described by ``manifest.json``)."""

    id: str
    kind: Literal["template", "user", "fork"]
    template: str
    directory: Path
    kernel: Path
    vcpus: int
    memory_mib: int
    accel: str
    qemu_version: str
    created_at: float
    source_sandbox: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    save_seconds: float = 0.0
    autostart: bool = True
    """Saved from a running guest: a restored VM runs as soon as its memory is loaded."""
    backing: str | None = None
    """The image ``disk.qcow2`` is layered on (a template image or snapshot disk)."""
    network: str = "none"
    """The network mode it was saved with: "none" restores only without a network; a
    "nat" one (whose user-mode network state is in it) only into "nat"; "tap" and the
    template's "detached" into "nat" or "tap"."""

    def check_network(self, mode: str) -> None:
        """Raise ``ConfigError`` unless a sandbox with network ``mode`` can restore this."""
        if self.network == "none":
            ok = mode == "none"
        elif self.network == "nat":
            ok = mode == "nat"
        else:
            ok = mode in ("nat", "tap")
        if not ok:
            raise ConfigError(
                f"snapshot {self.id} was saved with network={self.network!r}; it cannot be "
                f"restored with network={mode!r}"
            )

    @property
    def memory(self) -> Path:
        return self.directory / MEMORY

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def ephemeral(self) -> bool:
        return self.kind == "fork"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["directory"] = str(self.directory)
        data["kernel"] = str(self.kernel)
        return data

    @classmethod
    def load(cls, directory: Path) -> Snapshot:
        try:
            data = json.loads((directory / MANIFEST).read_text())
            data["directory"] = Path(data["directory"])
            data["kernel"] = Path(data["kernel"])
            snap = cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SnapshotNotFound(f"no readable snapshot in {directory}: {exc}") from exc
        if not (snap.memory.is_file() and snap.disk.is_file()):
            raise SnapshotNotFound(f"snapshot {snap.id} is incomplete (files missing)")
        return snap

    def write_manifest(self) -> None:
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(self.directory / MANIFEST)

    def check_compatible(self, accel: str, qemu_version: str) -> None:
        """Raise unless this host can restore the snapshot (files there, same VMM)."""
        if not (self.memory.is_file() and self.disk.is_file()):
            raise SnapshotNotFound(f"snapshot {self.id} was deleted (its files are gone)")
        if accel != self.accel:
            raise SnapshotIncompatible(
                f"snapshot {self.id} was made under {self.accel}; this host uses {accel}"
            )
        if qemu_version != self.qemu_version:
            raise SnapshotIncompatible(
                f"snapshot {self.id} was made by {self.qemu_version!r}; this host has "
                f"{qemu_version!r}"
            )
        if not self.kernel.is_file():
            raise SnapshotIncompatible(f"snapshot {self.id}: its kernel {self.kernel} is gone")
        if self.backing is not None and not Path(self.backing).is_file():
            raise SnapshotIncompatible(
                f"snapshot {self.id}: the image its disk is layered on ({self.backing}) is gone"
            )


def template_snapshot_key(
    image_digest: str,
    kernel_digest: str,
    qemu_version: str,
    accel: str,
    vcpus: int,
    mem: int,
    nic: bool = False,
) -> str:
    parts = [
        SNAPSHOT_RECIPE,
        image_digest,
        kernel_digest,
        qemu_version,
        accel,
        str(vcpus),
        str(mem),
    ]
    if nic:
        parts.append("nic")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def snapshots_dir() -> Path:
    return state_dir() / "snapshots"


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(5)


async def capture(
    vm: QemuVM,
    agent: AgentClient,
    directory: Path,
    *,
    resume: bool,
    drop_caches: bool = True,
    quiesce_timeout: float = 30,
) -> float:
    """Save ``vm`` into ``directory`` (memory.bin + disk.qcow2); returns the seconds it
    took. The guest's root file system is flushed and frozen first (optionally with clean
    caches dropped, for a smaller memory image), so the disk cannot change while the
    running VM's memory is saved (QEMU's live migration to a file, which leaves the VM
    paused); the overlay is copied after that, once QEMU has flushed it. With ``resume``
    the VM then continues and is thawed. On failure the partial files are removed."""
    directory.mkdir(parents=True, exist_ok=False)
    await agent.call("freeze", drop_caches=drop_caches, timeout=quiesce_timeout)
    t0 = time.monotonic()
    try:
        await vm.save_memory(directory / MEMORY)
        await asyncio.to_thread(shutil.copyfile, vm.spec.paths.overlay, directory / DISK)
        (directory / DISK).chmod(0o444)
        (directory / MEMORY).chmod(0o444)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        took = time.monotonic() - t0
        if resume and vm.is_running():
            with contextlib.suppress(Exception):
                await vm.resume()
            with contextlib.suppress(Exception):
                await agent.call("thaw", timeout=quiesce_timeout)
    return took


def list_snapshots(include_ephemeral: bool = False) -> list[Snapshot]:
    """User snapshots on this host (oldest first)."""
    base = snapshots_dir()
    if not base.is_dir():
        return []
    found = []
    for directory in base.iterdir():
        with contextlib.suppress(SnapshotNotFound):
            snap = Snapshot.load(directory)
            if include_ephemeral or not snap.ephemeral:
                found.append(snap)
    return sorted(found, key=lambda s: s.created_at)


def get_snapshot(snapshot_id: str) -> Snapshot:
    if not snapshot_id or "/" in snapshot_id or snapshot_id.startswith("."):
        raise SnapshotNotFound(f"invalid snapshot id {snapshot_id!r}")
    directory = snapshots_dir() / snapshot_id
    if not directory.is_dir():
        raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
    return Snapshot.load(directory)


def layered_on(snap: Snapshot) -> list[Snapshot]:
    """Snapshots whose disk is layered on ``snap``'s disk (they need it to restore)."""
    disk = str(snap.disk)
    return [s for s in list_snapshots(include_ephemeral=True) if s.backing == disk]


def delete_snapshot(snapshot: Snapshot | str) -> None:
    """Remove a user snapshot's files. Sandboxes already restored from it keep running
    (they hold its disk open), but new restores from it are no longer possible. A
    snapshot that other snapshots are layered on is refused: delete those first."""
    snap = get_snapshot(snapshot if isinstance(snapshot, str) else snapshot.id)
    if snap.kind == "template":
        raise SnapshotError("template snapshots are managed by the template cache")
    dependents = layered_on(snap)
    if dependents:
        ids = ", ".join(s.id for s in dependents)
        raise SnapshotError(f"snapshot {snap.id} is the base of {ids}; delete those first")
    shutil.rmtree(snap.directory, ignore_errors=True)
    base = _snapshot_of_disk(snap.backing)
    if base is not None and base.ephemeral:
        drop_unused_fork_snapshot(base)


def _snapshot_of_disk(disk: str | None) -> Snapshot | None:
    if disk is None:
        return None
    path = Path(disk)
    if path.name != DISK or path.parent.parent != snapshots_dir():
        return None
    try:
        return Snapshot.load(path.parent)
    except SnapshotNotFound:
        return None


def drop_unused_fork_snapshot(snap: Snapshot) -> None:
    """A fork's snapshot lives as long as a sandbox restored from it runs, or a snapshot
    is layered on it."""
    from .state import list_sandboxes

    if any(i.source_snapshot == snap.id and i.alive for i in list_sandboxes()):
        return
    if layered_on(snap):
        return
    shutil.rmtree(snap.directory, ignore_errors=True)


def build_template_snapshot(
    manager: TemplateManager, built: BuiltTemplate, *, accel: str | None = None, nic: bool = False
) -> Snapshot:
    """Boot the template cold with its default machine shape, save it, kill it. With
    ``nic`` the VM has a network device (and no egress): what networked sandboxes restore.

    Blocking; runs its own event loop on a worker thread, so it may be called from
    anywhere (also from inside a running loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = _build_template_snapshot(manager, built, accel, nic)
        return pool.submit(asyncio.run, job).result()


async def _build_template_snapshot(
    manager: TemplateManager, built: BuiltTemplate, accel: str | None, nic: bool
) -> Snapshot:
    from .providers.qemu import choose_accel, qemu_version
    from .sandbox import AsyncSandbox

    tpl = built.template
    accel = accel or choose_accel().name
    dest = manager.snapshot_dir(tpl, tpl.vcpus, tpl.memory_mib, accel, nic=nic)
    partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sb = await AsyncSandbox.create(
        tpl.name, cold=True, timeout=None, templates=manager, network=DETACHED if nic else "none"
    )
    try:
        vm, agent = sb._vm, sb._agent
        if vm is None or agent is None:
            raise SnapshotError("the template VM is not running")
        # Warm up what a sandbox's first commands use (the agent's spawn path, the shell,
        # the Python interpreter): their pages are then in the snapshot's page cache
        # instead of being read through the disk chain after every restore.
        for warm in WARMUP_COMMANDS:
            await sb.commands.run(warm, timeout=60)
        stopped = await capture(vm, agent, partial, resume=False, drop_caches=False)
    finally:
        await sb.kill()
    snap = Snapshot(
        id=f"template-{tpl.name}-{dest.name}",
        kind="template",
        template=tpl.name,
        directory=dest,
        kernel=built.kernel,
        vcpus=tpl.vcpus,
        memory_mib=tpl.memory_mib,
        accel=accel,
        qemu_version=qemu_version(),
        created_at=time.time(),
        size_bytes=(partial / MEMORY).stat().st_size + (partial / DISK).stat().st_size,
        save_seconds=round(stopped, 3),
        backing=str(built.rootfs),
        network=DETACHED if nic else "none",
    )
    (partial / MANIFEST).write_text(json.dumps(snap.to_json(), indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    log.info("template %s snapshot saved: %s (%d bytes)", tpl.name, dest, snap.size_bytes)
    return snap
