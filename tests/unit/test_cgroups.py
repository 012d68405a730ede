"""The cgroup logic against directory trees shaped like /sys/fs/cgroup.

A plain directory is not cgroupfs: here the test plays the kernel's part where it must
(a new group directory holds a ``cgroup.procs`` file), and a write to ``cgroup.procs``
just lands in the file. The v1 layout also runs for real
in tests/integration/test_confinement.py; the v2 layout only runs here (our hosts offer
no v2 hierarchy with the memory and pids controllers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novasandbox.errors import ConfigError, ProviderError
from novasandbox.host import cgroups
from novasandbox.host.cgroups import GROUP, Layout, VMMGroup, detect, limits_for
from novasandbox.host.limits import CGROUP_OVERHEAD_MIB

V1_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""


def v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    return root


def always(_: Path) -> bool:
    return True


def test_parse_mounts() -> None:
    v2, v1 = cgroups.parse_mounts(V1_MOUNTS)
    assert v2 == Path("/sys/fs/cgroup/unified")
    assert v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }


def test_limits() -> None:
    limits = limits_for(vcpus=2, memory_mib=512)
    assert limits.memory_bytes == (512 + CGROUP_OVERHEAD_MIB) << 20
    assert limits.tasks == cgroups.TASKS_BASE + 2
    assert limits.cpu_quota_us == 3 * limits.cpu_period_us


def test_detect_prefers_v2_with_controllers(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    mounts = V1_MOUNTS.replace("/sys/fs/cgroup/unified", str(root))
    layout = detect({}, mounts, euid=0, writable=always)
    assert layout == Layout(2, {"memory": root, "pids": root, "cpu": root})


def test_detect_uses_v1_when_v2_has_no_controllers(tmp_path: Path) -> None:
    root = v2_tree(tmp_path, controllers="hugetlb")
    mounts = V1_MOUNTS.replace("/sys/fs/cgroup/unified", str(root))
    layout = detect({}, mounts, euid=0, writable=always)
    assert layout is not None and layout.version == 1
    assert layout.hierarchies["memory"] == Path("/sys/fs/cgroup/memory")
    assert "v1" in layout.describe()


def test_detect_none_without_root_or_when_off_or_unwritable(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    mounts = V1_MOUNTS.replace("/sys/fs/cgroup/unified", str(root))
    assert detect({}, mounts, euid=1000, writable=always) is None
    assert detect({"NOVASANDBOX_CGROUPS": "off"}, mounts, euid=0, writable=always) is None
    assert detect({}, mounts, euid=0, writable=lambda p: False) is None
    assert detect({}, "", euid=0, writable=always) is None


def test_detect_forced_choice(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    mounts = V1_MOUNTS.replace("/sys/fs/cgroup/unified", str(root))
    forced = detect({"NOVASANDBOX_CGROUPS": "v1"}, mounts, euid=0, writable=always)
    assert forced is not None and forced.version == 1
    with pytest.raises(ConfigError, match="v2"):
        detect({"NOVASANDBOX_CGROUPS": "v2"}, V1_MOUNTS, euid=0, writable=always)
    with pytest.raises(ConfigError, match="NOVASANDBOX_CGROUPS"):
        detect({"NOVASANDBOX_CGROUPS": "yes"}, mounts, euid=0, writable=always)


def kernel_makes_group(layout: Layout, name: str) -> None:
    """What mkdir in cgroupfs does: the directory comes with its control files."""
    for directory in layout.group_dirs(name):
        directory.mkdir(parents=True)
        (directory / "cgroup.procs").write_text("")


def test_v2_group_enables_controllers_and_writes_limits(tmp_path: Path) -> None:
    root = v2_tree(tmp_path)
    layout = Layout(2, {"memory": root, "pids": root, "cpu": root})
    kernel_makes_group(layout, "sb-1")
    (root / GROUP / "cgroup.subtree_control").write_text("")
    group = VMMGroup.create(layout, "sb-1", limits_for(1, 256))
    directory = root / GROUP / "sb-1"
    assert group.dirs == [directory]
    assert (directory / "memory.max").read_text() == str((256 + 256) << 20)
    assert (directory / "pids.max").read_text() == str(cgroups.TASKS_BASE + 1)
    assert (directory / "cpu.max").read_text() == "200000 100000"
    for parent in (root, root / GROUP):
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        assert enabled == ["+cpu", "+memory", "+pids"]
    assert_joins_then_execs(group)


def assert_joins_then_execs(group: VMMGroup) -> None:
    """The spawn prefix really runs: it writes the shell's pid (the exec'd program's)
    into every cgroup.procs, then execs the command."""
    probe = [sys.executable, "-c", "import os; print(os.getpid())"]
    out = subprocess.run(group.spawn_prefix() + probe, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for directory in group.dirs:
        assert (directory / "cgroup.procs").read_text().strip() == out.stdout.strip()


def test_v1_group_writes_each_hierarchy(tmp_path: Path) -> None:
    hierarchies = {c: tmp_path / c for c in ("memory", "pids", "cpu")}
    layout = Layout(1, hierarchies)
    kernel_makes_group(layout, "sb-2")
    group = VMMGroup.create(layout, "sb-2", limits_for(2, 512))
    assert len(group.dirs) == 3
    g = f"{GROUP}/sb-2"
    assert (tmp_path / "memory" / g / "memory.limit_in_bytes").read_text() == str(768 << 20)
    assert (tmp_path / "pids" / g / "pids.max").read_text() == str(cgroups.TASKS_BASE + 2)
    assert (tmp_path / "cpu" / g / "cpu.cfs_quota_us").read_text() == "300000"
    assert (tmp_path / "cpu" / g / "cpu.cfs_period_us").read_text() == "100000"
    assert_joins_then_execs(group)


def test_spawn_prefix_fails_rather_than_run_outside_the_group(tmp_path: Path) -> None:
    layout = Layout(1, {"memory": tmp_path / "memory", "pids": tmp_path / "pids"})
    group = VMMGroup(layout, "sb-5")  # its directories were never made
    out = subprocess.run([*group.spawn_prefix(), "echo", "ran"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ran" not in out.stdout


def test_failed_setup_is_a_typed_error_and_leaves_nothing(tmp_path: Path) -> None:
    layout = Layout(1, {c: tmp_path / "absent" / c for c in ("memory", "pids")})
    with pytest.raises(ProviderError, match="control group"):
        VMMGroup.create(layout, "sb-3", limits_for(1, 256))
    assert not (tmp_path / "absent").exists()


def test_oom_kill_is_read_from_the_memory_controller(tmp_path: Path) -> None:
    layout = Layout(1, {"memory": tmp_path / "memory", "pids": tmp_path / "pids"})
    kernel_makes_group(layout, "sb-4")
    group = VMMGroup(layout, "sb-4")
    oom = tmp_path / "memory" / GROUP / "sb-4" / "memory.oom_control"
    oom.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not group.oom_killed()
    oom.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert group.oom_killed()
    root = v2_tree(tmp_path)
    v2 = Layout(2, {"memory": root, "pids": root})
    kernel_makes_group(v2, "sb-4")
    (root / GROUP / "sb-4" / "memory.events").write_text(
        "low 0\nhigh 0\nmax 9\noom 1\noom_kill 2\n"
    )
    assert VMMGroup(v2, "sb-4").oom_killed()


def test_sweep_removes_only_old_empty_unclaimed_groups(tmp_path: Path) -> None:
    layout = Layout(1, {"memory": tmp_path / "memory", "pids": tmp_path / "pids"})
    for name in ("old", "young", "busy", "claimed"):
        for directory in layout.group_dirs(name):
            # (no control files: a real group's do not stop rmdir, a plain file would)
            directory.mkdir(parents=True)
    for directory in layout.group_dirs("busy"):
        (directory / "cgroup.procs").write_text("4242\n")
    past = time.time() - cgroups.ORPHAN_AGE_S - 5
    for name in ("old", "busy", "claimed"):
        for directory in layout.group_dirs(name):
            os.utime(directory, (past, past))
    removed = cgroups.sweep(lambda name: name == "claimed", layout)
    assert removed == ["old"]
    names = {d.name for d in (tmp_path / "memory" / GROUP).iterdir()}
    assert names == {"young", "busy", "claimed"}


def test_groups_of_names_only_the_groups_of_the_ids_asked_for(tmp_path: Path) -> None:
    layout = Layout(1, {"memory": tmp_path / "memory", "pids": tmp_path / "pids"})
    for name in ("sb-mine", "sb-busy", "sb-other"):
        for directory in layout.group_dirs(name):
            directory.mkdir(parents=True)
    for directory in layout.group_dirs("sb-busy"):
        (directory / "cgroup.procs").write_text("4242\n")  # a live VMM's: still a leftover
    found = cgroups.groups_of(["sb-mine", "sb-busy", "sb-gone", "sb-mine"], layout)
    assert found == sorted(str(d) for n in ("sb-mine", "sb-busy") for d in layout.group_dirs(n))
    assert cgroups.groups_of([], layout) == []
    assert cgroups.groups_of(["sb-gone"], Layout(1, {"memory": tmp_path / "absent"})) == []
