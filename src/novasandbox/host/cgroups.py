"""Host-side limits on a VMM process through a control group of its own.

Each VMM joins ``novasandbox/<sandbox id>`` before it runs a line of QEMU (a shell
writes its own pid into ``cgroup.procs`` and execs QEMU), with a memory limit (guest
RAM plus the VMM's own overhead), a task limit and a CPU quota of one core per vCPU plus
one for QEMU's main loop. The group is removed once the VMM has exited, by its owner or
by ``gc``.

Two layouts are handled:

- **cgroup v2**, where the unified hierarchy has the memory and pids controllers. This is
  the layout of current distributions. Our development hosts do not offer it (see
  below): the v2 code is covered by unit tests against a directory tree shaped like
  ``/sys/fs/cgroup`` and has not run against a real v2 hierarchy here.
- **cgroup v1**, where those controllers are mounted as separate hierarchies (and the
  unified one, if any, has none of them): what our development hosts run, and what the
  integration tests exercise.

Without root, or with neither layout writable, there are no cgroup limits and the VMM's
rlimits are all that applies (``novasandbox doctor`` says which). ``NOVASANDBOX_CGROUPS``
= ``auto`` (default), ``v2``, ``v1`` or ``off`` forces a choice.
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ProviderError
from .limits import CGROUP_OVERHEAD_MIB

GROUP = "novasandbox"
"""The parent group under which each VMM gets its own."""

CPU_PERIOD_US = 100_000
TASKS_BASE = 128
"""Tasks (threads) a VMM may have beyond one per vCPU: QEMU's I/O thread pool alone can
grow to 64, and a VMM that cannot start a thread aborts."""
ORPHAN_AGE_S = 60.0
"""An empty group this old whose sandbox is gone is swept by ``gc`` (a younger one may
belong to a VMM about to join it)."""


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int
    tasks: int
    cpu_quota_us: int
    cpu_period_us: int = CPU_PERIOD_US


def limits_for(vcpus: int, memory_mib: int) -> Limits:
    """The limits of a VMM whose guest has ``vcpus`` and ``memory_mib``. Pure."""
    return Limits(
        memory_bytes=(memory_mib + CGROUP_OVERHEAD_MIB) << 20,
        tasks=TASKS_BASE + vcpus,
        cpu_quota_us=(vcpus + 1) * CPU_PERIOD_US,
    )


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the groups live: ``version`` 2 has one hierarchy with every controller; 1 has
    one per controller (the same path may carry several, as in ``cpu,cpuacct``)."""

    version: int
    hierarchies: Mapping[str, Path] = field(default_factory=dict)
    """controller ("memory", "pids", "cpu") -> the hierarchy's mount point"""

    def parents(self) -> list[Path]:
        return sorted({mount / GROUP for mount in self.hierarchies.values()})

    def group_dirs(self, name: str) -> list[Path]:
        return [parent / name for parent in self.parents()]

    def settings(self, limits: Limits) -> dict[str, str]:
        """Control file -> value, for the files this layout has."""
        if self.version == 2:
            out = {
                "memory.max": str(limits.memory_bytes),
                "pids.max": str(limits.tasks),
            }
            if "cpu" in self.hierarchies:
                out["cpu.max"] = f"{limits.cpu_quota_us} {limits.cpu_period_us}"
            return out
        out = {}
        if "memory" in self.hierarchies:
            out["memory.limit_in_bytes"] = str(limits.memory_bytes)
        if "pids" in self.hierarchies:
            out["pids.max"] = str(limits.tasks)
        if "cpu" in self.hierarchies:
            out["cpu.cfs_period_us"] = str(limits.cpu_period_us)
            out["cpu.cfs_quota_us"] = str(limits.cpu_quota_us)
        return out

    def file_dir(self, name: str, control_file: str) -> Path:
        """The group directory of ``name`` that holds ``control_file``."""
        controller = control_file.split(".", 1)[0]
        return self.hierarchies[controller] / GROUP / name

    def describe(self) -> str:
        if self.version == 2:
            root = next(iter(self.hierarchies.values()))
            return f"cgroup v2 at {root} ({', '.join(sorted(self.hierarchies))})"
        return (
            "cgroup v1 ("
            + ", ".join(f"{c} at {p}" for c, p in sorted(self.hierarchies.items()))
            + ")"
        )


def parse_mounts(mounts: str) -> tuple[Path | None, dict[str, Path]]:
    """The v2 mount point and the v1 controller -> mount point map in a /proc/self/mounts
    text. Pure."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount, fstype, options = Path(parts[1]), parts[2], parts[3].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = mount
        elif fstype == "cgroup":
            for controller in ("memory", "pids", "cpu"):
                if controller in options:
                    v1.setdefault(controller, mount)
    return v2, v1


def detect(
    env: Mapping[str, str] | None = None,
    mounts: str | None = None,
    euid: int | None = None,
    writable: Callable[[Path], bool] = lambda p: os.access(p, os.W_OK),
) -> Layout | None:
    """The layout to use on this host, or None (no cgroup limits)."""
    env = os.environ if env is None else env
    choice = env.get("NOVASANDBOX_CGROUPS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "v1", "v2", "off"):
        raise ConfigError(f"NOVASANDBOX_CGROUPS must be auto, v1, v2 or off, got {choice!r}")
    if choice == "off" or (os.geteuid() if euid is None else euid) != 0:
        return None
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    v2, v1 = parse_mounts(mounts)
    if choice in ("auto", "v2") and v2 is not None:
        try:
            available = (v2 / "cgroup.controllers").read_text().split()
        except OSError:
            available = []
        if {"memory", "pids"} <= set(available) and writable(v2):
            controllers = [c for c in ("memory", "pids", "cpu") if c in available]
            return Layout(2, {c: v2 for c in controllers})
    v1_usable = {"memory", "pids"} <= set(v1) and all(writable(p) for p in v1.values())
    if choice in ("auto", "v1") and v1_usable:
        return Layout(1, v1)
    if choice != "auto":
        raise ConfigError(
            f"NOVASANDBOX_CGROUPS={choice}, but this host has no writable {choice} "
            "hierarchy with the memory and pids controllers"
        )
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _enable_v2_controllers(layout: Layout) -> None:
    """In v2 a group's controllers must be enabled in its parent's subtree_control: the
    root's (for ``novasandbox``) and ``novasandbox``'s (for each VMM's group)."""
    root = next(iter(layout.hierarchies.values()))
    wanted = " ".join(f"+{c}" for c in sorted(layout.hierarchies))
    for directory in (root, root / GROUP):
        enabled = (directory / "cgroup.subtree_control").read_text().split()
        if not set(layout.hierarchies) <= set(enabled):
            _write(directory / "cgroup.subtree_control", wanted)


class VMMGroup:
    """The control group(s) of one VMM: created with its limits before the VMM starts,
    joined by the VMM's process before it execs QEMU (``spawn_prefix``), removed after
    it exits."""

    def __init__(self, layout: Layout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.dirs = layout.group_dirs(name)

    @classmethod
    def create(cls, layout: Layout, name: str, limits: Limits) -> VMMGroup:
        group = cls(layout, name)
        try:
            for parent in layout.parents():
                parent.mkdir(exist_ok=True)
            if layout.version == 2:
                _enable_v2_controllers(layout)
            for directory in group.dirs:
                directory.mkdir(exist_ok=True)  # the kernel fills it with control files
            for control, value in layout.settings(limits).items():
                _write(layout.file_dir(name, control) / control, value)
        except OSError as exc:
            group.remove()
            raise ProviderError(f"cannot set up the VMM's control group {name}: {exc}") from exc
        return group

    def spawn_prefix(self) -> list[str]:
        """An argv prefix that joins the group and then execs the rest of the command
        line: a ``/bin/sh`` writes its own pid (which the exec keeps) into each
        ``cgroup.procs``, so the VMM is in its group before its first instruction, and
        the caller needs no ``preexec_fn`` (with one, ``subprocess`` forks the whole,
        possibly large, Python process instead of using vfork: 11 ms with a 300 MB heap)."""
        writes = " && ".join(f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{writes} && exec "$@"', "novasandbox-vmm"]

    def read(self, control_file: str) -> str | None:
        try:
            return (self.layout.file_dir(self.name, control_file) / control_file).read_text()
        except (OSError, KeyError):
            return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a task of this group for exceeding its memory limit."""
        if self.layout.version == 2:
            text = self.read("memory.events") or ""
        else:
            text = self.read("memory.oom_control") or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def remove(self, timeout: float = 2.0) -> None:
        """Remove the group's directories. The kernel refuses while a task is in it (a
        killed VMM leaves a moment after its exit status is collected): retried."""
        remove_group_dirs(self.dirs, timeout)


def remove_group_dirs(dirs: list[Path], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    left = list(dirs)
    while left:
        for directory in list(left):
            try:
                directory.rmdir()
                left.remove(directory)
            except FileNotFoundError:
                left.remove(directory)
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
        if left:
            time.sleep(0.01)
    return True


def remove_group(name: str, layout: Layout | None = None) -> bool:
    """Remove the group of sandbox ``name`` (from any process; after its VMM is gone)."""
    layout = layout if layout is not None else _quiet_detect()
    if layout is None:
        return True
    return remove_group_dirs(layout.group_dirs(name))


def sweep(keep: Callable[[str], bool], layout: Layout | None = None) -> list[str]:
    """Remove empty groups older than ``ORPHAN_AGE_S`` whose sandbox ``keep`` does not
    claim: what VMMs killed by others (or a crashed owner) left. Returns their names."""
    layout = layout if layout is not None else _quiet_detect()
    if layout is None:
        return []
    removed = []
    now = time.time()
    for parent in layout.parents():
        if not parent.is_dir():
            continue
        for directory in parent.iterdir():
            if not directory.is_dir() or keep(directory.name):
                continue
            try:
                if now - directory.stat().st_mtime < ORPHAN_AGE_S:
                    continue
                if _tasks(directory):
                    continue
                directory.rmdir()
            except OSError:
                continue
            removed.append(directory.name)
    return sorted(set(removed))


def groups_of(names: Iterable[str], layout: Layout | None = None) -> list[str]:
    """The group directories that exist of the sandboxes ``names`` (empty or not): what a
    test checks its own sandboxes did not leave behind, whatever other processes of the
    host run at the same time."""
    layout = layout if layout is not None else _quiet_detect()
    if layout is None:
        return []
    return sorted(str(d) for name in set(names) for d in layout.group_dirs(name) if d.is_dir())


def empty_groups(layout: Layout | None = None) -> list[str]:
    """VMM groups that hold no process (a live sandbox's group holds its VMM), of every
    NovaSandbox process of the host: what the soak script checks was not left behind
    (tests judge only their own sandboxes' groups: ``groups_of``)."""
    layout = layout if layout is not None else _quiet_detect()
    if layout is None:
        return []
    empty = []
    for parent in layout.parents():
        for directory in parent.iterdir() if parent.is_dir() else []:
            if directory.is_dir() and not _tasks(directory):
                empty.append(str(directory))
    return sorted(empty)


def _tasks(directory: Path) -> str:
    try:
        return (directory / "cgroup.procs").read_text().strip()
    except FileNotFoundError:  # removed meanwhile
        return ""


def _quiet_detect() -> Layout | None:
    try:
        return detect()
    except ConfigError:
        return None
