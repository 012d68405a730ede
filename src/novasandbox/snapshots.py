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
from typing import Any, Literal

from .config import MachineConfig
from .errors import ConfigError, SnapshotError, SnapshotIncompatible, SnapshotNotFound
from .paths import state_dir
from .records import list_sandboxes
from .templates import BuiltTemplate, Template, TemplateManager

log = logging.getLogger("novasandbox.snapshots")

SNAPSHOT_RECIPE = "10"
"""Bump when what a template snapshot contains changes (10: paths relative, so the cache
can move)."""
MANIFEST = "manifest.json"
MEMORY = "memory.bin"
DISK = "disk.qcow2"


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
    """The VMM's version (the manifest's name for it predates other providers)."""
    created_at: float
    source_sandbox: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    save_seconds: float = 0.0
    autostart: bool = True
    """Saved from a running guest: a restored VM runs as soon as its memory is loaded."""
    backing: str | None = None
    """The image ``disk.qcow2`` is layered on (a template image or snapshot disk)."""
    frozen: bool = True
    """Its guest's root file system was frozen when it was saved (every snapshot before
    recipe 9 was): a restore thaws it. Newer snapshots are not frozen."""
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
        """The snapshot in ``directory`` (wherever its manifest says it was saved: a
        cache that moved takes its snapshots along). Relative paths in the manifest are
        relative to ``directory``."""
        try:
            data = json.loads((directory / MANIFEST).read_text())
            data["directory"] = directory
            data["kernel"] = Path(os.path.normpath(directory / data["kernel"]))
            if data.get("backing") is not None:
                data["backing"] = os.path.normpath(directory / data["backing"])
            snap = cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SnapshotNotFound(f"no readable snapshot in {directory}: {exc}") from exc
        if not (snap.memory.is_file() and snap.disk.is_file()):
            raise SnapshotNotFound(f"snapshot {snap.id} is incomplete (files missing)")
        return snap

    def manifest_text(self) -> str:
        """``manifest.json``: a template's snapshot (in the template cache) names its
        kernel and backing image relative to its own folder, so the cache can move; a
        user snapshot (in the state directory) names them where they are."""
        data = self.to_json()
        if self.kind == "template":
            data["directory"] = "."
            data["kernel"] = os.path.relpath(self.kernel, self.directory)
            if self.backing is not None:
                data["backing"] = os.path.relpath(self.backing, self.directory)
        return json.dumps(data, indent=2)

    def write_manifest(self) -> None:
        tmp = self.directory / (MANIFEST + ".tmp")
        tmp.write_text(self.manifest_text())
        tmp.replace(self.directory / MANIFEST)

    def check_compatible(self, engine: Engine) -> None:
        """Raise unless this host can restore the snapshot (files there, same VMM)."""
        if not (self.memory.is_file() and self.disk.is_file()):
            raise SnapshotNotFound(f"snapshot {self.id} was deleted (its files are gone)")
        if engine.accel != self.accel:
            raise SnapshotIncompatible(
                f"snapshot {self.id} was made under {self.accel}; this host uses {engine.accel}"
            )
        if engine.version != self.qemu_version:
            raise SnapshotIncompatible(
                f"snapshot {self.id} was made by {self.qemu_version!r}; this host has "
                f"{engine.version!r}"
            )
        if not self.kernel.is_file():
            raise SnapshotIncompatible(f"snapshot {self.id}: its kernel {self.kernel} is gone")
        if self.backing is not None and not Path(self.backing).is_file():
            raise SnapshotIncompatible(
                f"snapshot {self.id}: the image its disk is layered on ({self.backing}) is gone"
            )


@dataclass(frozen=True, slots=True)
class Engine:
    """What a saved VM state depends on besides the guest: the VMM's version and how it
    runs guest code. A snapshot restores only under the same engine."""

    accel: str
    version: str
    """The VMM's version and the guest CPU model it emulates or passes through
    (``QEMU emulator version 7.2.x cpu=x86-64-v2``): a snapshot's CPU state restores only
    into the same model."""


def saved(
    *,
    snapshot_id: str,
    kind: Literal["template", "user", "fork"],
    template: str,
    directory: Path,
    files: Path,
    kernel: Path,
    backing: Path,
    config: MachineConfig,
    engine: Engine,
    took: float,
    network: str,
    env: dict[str, str] | None = None,
    source_sandbox: str | None = None,
    frozen: bool = False,
) -> Snapshot:
    """The ``Snapshot`` of a VM just saved into ``files`` (``memory.bin`` and
    ``disk.qcow2``), to live at ``directory`` (the same, or where ``files`` is renamed to)."""
    return Snapshot(
        id=snapshot_id,
        kind=kind,
        template=template,
        directory=directory.absolute(),
        kernel=kernel.absolute(),
        vcpus=config.vcpus,
        memory_mib=config.memory_mib,
        accel=engine.accel,
        qemu_version=engine.version,
        created_at=time.time(),
        source_sandbox=source_sandbox,
        env=dict(env or {}),
        size_bytes=(files / MEMORY).stat().st_size + (files / DISK).stat().st_size,
        save_seconds=round(took, 3),
        backing=str(backing.absolute()),
        network=network,
        frozen=frozen,
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


def template_snapshot_dir(
    manager: TemplateManager,
    tpl: Template,
    vcpus: int,
    memory_mib: int,
    engine: Engine,
    *,
    nic: bool = False,
) -> Path:
    """Where the template's snapshot for this machine shape and engine lives."""
    key = template_snapshot_key(
        tpl.image_digest, tpl.kernel_digest, engine.version, engine.accel, vcpus, memory_mib, nic
    )
    return manager.image_dir(tpl) / "snapshots" / key


def current_template_snapshot(
    tpl: Template, directory: Path, engine: Engine | None = None
) -> Snapshot | None:
    """The snapshot in ``directory`` (one of the template image's ``snapshots/``) if the
    template as defined now restores it: its key is the one of the template's machine
    shape (with or without a network device) and of the engine it was made by (and that
    engine is ``engine``, when given). None for one of an older recipe or shape."""
    try:
        snap = Snapshot.load(directory)
    except SnapshotNotFound:
        return None
    if engine is not None and (snap.accel, snap.qemu_version) != (engine.accel, engine.version):
        return None
    keys = {
        template_snapshot_key(
            tpl.image_digest,
            tpl.kernel_digest,
            snap.qemu_version,
            snap.accel,
            tpl.vcpus,
            tpl.memory_mib,
            nic,
        )
        for nic in (False, True)
    }
    return snap if directory.name in keys else None


def stale_template_snapshots(manager: TemplateManager, tpl: Template, engine: Engine) -> list[Path]:
    """The template's snapshots (of its current image) that ``engine`` made and no
    create restores any more: an older snapshot recipe, another default shape; and those
    the same VMM made with another guest CPU model (an older NovaSandbox's)."""
    base = manager.image_dir(tpl) / "snapshots"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            snap = Snapshot.load(entry)
        except SnapshotNotFound:
            continue
        mine = (snap.accel, snap.qemu_version) == (engine.accel, engine.version)
        if mine and current_template_snapshot(tpl, entry) is None:
            stale.append(entry)
        elif (
            not mine
            and snap.accel == engine.accel
            and _vmm(snap.qemu_version) == _vmm(engine.version)
        ):
            stale.append(entry)  # this VMM, another CPU model: nothing restores it here
    return stale


def _vmm(version: str) -> str:
    """The VMM's own version in an engine's (``Engine.version`` without ``cpu=...``)."""
    return version.split(" cpu=")[0]


def template_snapshot(
    manager: TemplateManager,
    built: BuiltTemplate,
    vcpus: int,
    memory_mib: int,
    engine: Engine,
    *,
    nic: bool = False,
) -> Snapshot | None:
    """The template's snapshot for this machine shape (with or without a network
    device) and engine, if it was made."""
    directory = template_snapshot_dir(manager, built.template, vcpus, memory_mib, engine, nic=nic)
    if not directory.is_dir():
        return None
    try:
        return Snapshot.load(directory)
    except SnapshotNotFound:
        return None


def shape_snapshot_dir(
    manager: TemplateManager,
    built: BuiltTemplate,
    vcpus: int,
    memory_mib: int,
    engine: Engine,
    network: str,
) -> Path:
    """Where the snapshot of this machine shape lives. Its key covers what the saved
    state depends on, the image file itself included (a rebuilt image, even with the
    same digest, has a new key)."""
    image = built.rootfs.stat()
    key = shape_snapshot_key(
        built.template.image_digest,
        built.template.kernel_digest,
        f"{image.st_ino}:{image.st_mtime_ns}",
        engine.version,
        engine.accel,
        vcpus,
        memory_mib,
        network,
    )
    return manager.shapes_dir(built.template) / key


def shape_snapshot(
    manager: TemplateManager,
    built: BuiltTemplate,
    vcpus: int,
    memory_mib: int,
    engine: Engine,
    network: str,
) -> Snapshot | None:
    """The saved snapshot of this machine shape (``network``: the sandbox's network
    mode), marked as just used; None if there is none (yet)."""
    directory = shape_snapshot_dir(manager, built, vcpus, memory_mib, engine, network)
    try:
        snap = Snapshot.load(directory)
    except SnapshotNotFound:
        return None
    with contextlib.suppress(OSError):  # a read-only cache: no LRU order, still usable
        os.utime(directory)
    return snap


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
    engine: Engine | None,
    *,
    cold: bool,
) -> BootPlan:
    """Restore the template's snapshot, or the saved one of this machine shape, or boot
    cold (and say why; the first cold boot of a shape saves a snapshot of it).
    ``engine`` None: the provider cannot restore snapshots."""
    tpl = built.template
    net = config.network
    if cold:
        return BootPlan(None, "cold=True")
    if engine is None:
        return BootPlan(None, "its provider cannot restore snapshots")
    if config.drives:
        return BootPlan(None, "extra drives (a snapshot cannot have them)")
    vcpus, memory_mib = config.vcpus, config.memory_mib
    snap = template_snapshot(manager, built, vcpus, memory_mib, engine, nic=net.enabled)
    if snap is not None:
        return BootPlan(snap)
    if (vcpus, memory_mib) == (tpl.vcpus, tpl.memory_mib):
        return BootPlan(
            None,
            f"the template's own snapshot is missing on this host "
            f"(`novasandbox template build {tpl.name}` makes it)",
        )
    shape = f"vcpus={vcpus} memory_mib={memory_mib} network={net.mode}"
    snap = shape_snapshot(manager, built, vcpus, memory_mib, engine, net.mode)
    if snap is not None:
        return BootPlan(snap)
    if manager.shape_snapshots == 0:
        return BootPlan(None, f"no snapshot of {tpl.name} for {shape} (shape_snapshots=0)")
    if not os.access(manager.image_dir(tpl), os.W_OK):
        return BootPlan(
            None, f"no snapshot of {tpl.name} for {shape} (the template cache is read-only)"
        )
    dest = shape_snapshot_dir(manager, built, vcpus, memory_mib, engine, net.mode)
    return BootPlan(
        None, f"no snapshot of {tpl.name} for {shape} yet: booting cold and saving one", dest
    )


def snapshots_dir() -> Path:
    return state_dir() / "snapshots"


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(5)


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
    if any(i.source_snapshot == snap.id and i.alive for i in list_sandboxes()):
        return
    if layered_on(snap):
        return
    shutil.rmtree(snap.directory, ignore_errors=True)


def drop_unused_fork_snapshots() -> None:
    """``drop_unused_fork_snapshot`` for every fork's snapshot (after sandboxes were
    reaped)."""
    for snap in list_snapshots(include_ephemeral=True):
        if snap.ephemeral:
            drop_unused_fork_snapshot(snap)
