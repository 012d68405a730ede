"""Snapshots: a VM's memory and device state plus its disk exactly as it was, restorable
into any number of new sandboxes.

A snapshot is a directory with ``memory.bin`` (QEMU's migration stream), ``disk.qcow2``
(a copy of the VM's copy-on-write overlay, taken while the VM was paused; its backing
chain ends at the template image) and ``manifest.json``. Each restored sandbox gets its
own overlay on top of ``disk.qcow2``, which is never written again.

* Template snapshots are made by ``novasandbox template build`` (boot once, wait for the
  agent, quiesce, save) and live in the template cache, keyed by everything the saved
  state depends on (image, kernel, QEMU version, accelerator, vCPUs, memory).
* Shape snapshots: the first cold boot of another machine shape of a template (other
  vCPUs or memory, with or without a network device) saves the just-booted guest before
  the sandbox is handed over, so that later creates of that shape restore it
  (``plan_boot``, ``save_shape_snapshot``). A few per template image (least recently
  used evicted; ``TemplateManager(shape_snapshots=...)``), in the template cache beside
  the template's own, removed with the template and when it is rebuilt.
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
import os
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
    from .config import MachineConfig
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


def shape_snapshot_key(
    image_digest: str,
    kernel_digest: str,
    image_file: str,
    qemu_version: str,
    accel: str,
    vcpus: int,
    mem: int,
    network: str,
) -> str:
    """The key of a shape snapshot: what its saved state depends on (``image_file``
    identifies the very image file it was booted from, ``network`` is the sandbox's
    network mode: a "nat" VM's state restores only into "nat")."""
    parts = [SNAPSHOT_RECIPE, "shape", image_digest, kernel_digest, image_file]
    parts += [qemu_version, accel, str(vcpus), str(mem), network]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class BootPlan:
    """How a new sandbox of a template starts, decided once by ``plan_boot``."""

    snapshot: Snapshot | None
    """What it restores; None: it boots cold."""
    cold_reason: str | None = None
    """Why it boots cold (None when it restores)."""
    save_shape: Path | None = None
    """Where its cold boot saves the snapshot of its machine shape (None: it does not)."""


def plan_boot(
    manager: TemplateManager,
    built: BuiltTemplate,
    config: MachineConfig,
    accel: str,
    *,
    cold: bool,
) -> BootPlan:
    """Restore the template's snapshot, or the saved one of this machine shape, or boot
    cold (and say why; the first cold boot of a shape saves a snapshot of it)."""
    tpl = built.template
    net = config.network
    if cold:
        return BootPlan(None, "cold=True")
    if config.drives:
        return BootPlan(None, "extra drives (a snapshot cannot have them)")
    snap = manager.template_snapshot(built, config.vcpus, config.memory_mib, accel, nic=net.enabled)
    if snap is not None:
        return BootPlan(snap)
    if (config.vcpus, config.memory_mib) == (tpl.vcpus, tpl.memory_mib):
        return BootPlan(
            None,
            f"the template's own snapshot is missing on this host "
            f"(`novasandbox template build {tpl.name}` makes it)",
        )
    shape = f"vcpus={config.vcpus} memory_mib={config.memory_mib} network={net.mode}"
    snap = manager.shape_snapshot(built, config.vcpus, config.memory_mib, accel, net.mode)
    if snap is not None:
        return BootPlan(snap)
    if manager.shape_snapshots == 0:
        return BootPlan(None, f"no snapshot of {tpl.name} for {shape} (shape_snapshots=0)")
    if not os.access(manager.image_dir(tpl), os.W_OK):
        return BootPlan(
            None, f"no snapshot of {tpl.name} for {shape} (the template cache is read-only)"
        )
    dest = manager.shape_snapshot_dir(built, config.vcpus, config.memory_mib, accel, net.mode)
    return BootPlan(
        None, f"no snapshot of {tpl.name} for {shape} yet: booting cold and saving one", dest
    )


async def save_shape_snapshot(
    manager: TemplateManager,
    built: BuiltTemplate,
    vm: QemuVM,
    agent: AgentClient,
    config: MachineConfig,
    accel: str,
    dest: Path,
) -> Snapshot | None:
    """Save a just-booted guest (nothing run in it yet) as the snapshot of its machine
    shape at ``dest``; the VM goes on running. What the host told it at boot (hostname,
    clock, lifetime, network settings) is told again to every sandbox restored from it,
    and its RNG is reseeded then, as for any snapshot; no environment is saved.

    Written under a temporary name and renamed into place, so a half-written snapshot is
    never used; when another process saved the same shape first, that one stays and
    None is returned. On failure nothing is left behind and the error propagates."""
    if dest.exists():
        return None
    dest.parent.mkdir(exist_ok=True)  # not its parents: a removed template stays removed
    partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
    try:
        took = await capture(vm, agent, partial, resume=True, drop_caches=False)
        snap = Snapshot(
            id=f"shape-{built.name}-{dest.name}",
            kind="template",
            template=built.name,
            directory=dest,
            kernel=built.kernel,
            vcpus=config.vcpus,
            memory_mib=config.memory_mib,
            accel=accel,
            qemu_version=_qemu_version(),
            created_at=time.time(),
            size_bytes=(partial / MEMORY).stat().st_size + (partial / DISK).stat().st_size,
            save_seconds=round(took, 3),
            backing=str(built.rootfs),
            network=config.network.mode,
        )
        (partial / MANIFEST).write_text(json.dumps(snap.to_json(), indent=2))
        try:
            partial.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.debug("the snapshot of %s was saved by another process first", dest)
            shutil.rmtree(partial, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(dest)  # the most recently used
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for gone in manager.evict_shape_snapshots(built.template, keep=dest):
        log.info("evicted the least recently used shape snapshot %s", gone.name)
    return snap


def _qemu_version() -> str:
    from .providers.qemu import qemu_version

    return qemu_version()


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
