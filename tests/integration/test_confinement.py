"""What a VMM may reach on the host: started as root, QEMU drops to a uid of its own and
is chrooted into an empty directory, so it holds only what it opened before."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from novasandbox import Sandbox, SandboxState, TemplateManager
from novasandbox.errors import NovaSandboxError, ProviderError
from novasandbox.host import cgroups
from novasandbox.host.plan import VMM_ID_BASE, VMM_ID_COUNT
from novasandbox.snapshots import delete_snapshot
from novasandbox.sync import _Portal

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="QEMU drops privileges only when started as root"
)


def status_field(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.split()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def qmp(sb: Sandbox, command: str, args: dict[str, Any]) -> object:
    vm = sb._inner._vm
    assert vm is not None
    return _Portal.call(vm._execute(command, args))


def test_vmm_runs_as_its_own_uid_in_an_empty_jail(factory: Any, state_root: Path) -> None:
    restored = factory.create()
    cold = factory.create(cold=True)
    infos = {i.id: i for i in Sandbox.list()}
    template_dir = TemplateManager().built("python").rootfs.parent  # type: ignore[union-attr]
    uids = set()
    for sb in (restored, cold):
        info = infos[sb.id]
        assert info.pid is not None and info.vmm_uid is not None
        pid, uid = info.pid, info.vmm_uid
        assert VMM_ID_BASE <= uid < VMM_ID_BASE + VMM_ID_COUNT
        # real, effective, saved and file-system ids: all the sandbox's own, none root
        assert status_field(pid, "Uid") == [str(uid)] * 4
        assert status_field(pid, "Gid") == [str(uid)] * 4
        assert status_field(pid, "Groups") in ([], [str(uid)])
        assert int(status_field(pid, "CapEff")[0], 16) == 0
        assert int(status_field(pid, "CapPrm")[0], 16) == 0
        assert status_field(pid, "Seccomp") == ["2"]
        jail = Path(info.state_dir) / "jail"
        assert os.readlink(f"/proc/{pid}/root") == str(jail)
        assert list(jail.iterdir()) == []
        # every file it holds is its sandbox's own or the template's (read-only)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("/") or target == "/dev/null":
                continue  # sockets, pipes, eventfds...
            assert Path(target).is_relative_to(info.state_dir) or Path(target).is_relative_to(
                template_dir
            ), f"QEMU holds {target}"
        uids.add(uid)
        # QEMU asked to open a host file, even one of its own sandbox by path, cannot
        for path in ("/etc/hostname", str(Path(info.state_dir) / "console.log")):
            with pytest.raises(
                ProviderError, match=r"Could not open .*(Permission denied|No such file)"
            ):
                qmp(
                    sb,
                    "blockdev-add",
                    {"driver": "file", "node-name": "probe", "filename": path},
                )
    assert len(uids) == 2


def test_confined_vmms_still_restore_write_and_snapshot(factory: Any) -> None:
    """Dropping root must not cost a feature: the disk is reopened after a restore, a
    snapshot is written to a descriptor, and a restore of that snapshot runs."""
    sb = factory.create()
    sb.files.write("/home/user/note", b"kept")
    assert sb.commands.run("sync && cat /home/user/note").stdout == "kept"
    snap = sb.snapshot()
    try:
        child = factory.create(from_snapshot=snap)
        assert child.files.read("/home/user/note") == "kept"
        child.files.write("/home/user/more", b"x" * (1 << 20))
        assert child.commands.run("stat -c %s /home/user/more").stdout.strip() == str(1 << 20)
    finally:
        for s in list(factory.sandboxes):
            s.kill()
        delete_snapshot(snap)


def cgroup_layout() -> cgroups.Layout:
    layout = cgroups.detect()
    if layout is None:
        pytest.skip("this host has no writable cgroup hierarchy with memory and pids")
    return layout


def groups_of(pid: int) -> dict[str, str]:
    """controller -> group path, from /proc/PID/cgroup ("" is the v2 hierarchy)."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def test_vmm_runs_in_a_control_group_of_its_own_with_limits(factory: Any) -> None:
    layout = cgroup_layout()
    sb = factory.create()
    info = next(i for i in Sandbox.list() if i.id == sb.id)
    assert info.pid is not None
    member = groups_of(info.pid)
    for controller in layout.hierarchies:
        key = "" if layout.version == 2 else controller
        assert member[key] == f"/{cgroups.GROUP}/{sb.id}"
    for control, value in layout.settings(cgroups.limits_for(1, 256)).items():
        assert (layout.file_dir(sb.id, control) / control).read_text().strip() == value
    sb.kill()
    for directory in layout.group_dirs(sb.id):
        assert not directory.exists()


def test_memory_limit_is_enforced_by_the_host_kernel(factory: Any) -> None:
    """Lower a VMM's memory limit under what its guest is about to touch: the host kernel
    kills that VMM (state crashed, reason given), and a second sandbox carries on."""
    layout = cgroup_layout()
    victim = factory.create()
    bystander = factory.create()
    usage, limit = (
        ("memory.current", "memory.max")
        if layout.version == 2
        else ("memory.usage_in_bytes", "memory.limit_in_bytes")
    )
    directory = layout.file_dir(victim.id, limit)
    used = int((directory / usage).read_text())
    (directory / limit).write_text(str(used + (24 << 20)))
    with pytest.raises(NovaSandboxError):
        victim.commands.run(
            "python3 -c 'b = b\"x\" * (160 << 20); import time; time.sleep(30)'", timeout=60
        )
    deadline = time.monotonic() + 10
    while victim.state is not SandboxState.CRASHED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.state is SandboxState.CRASHED
    assert victim.crash_reason is not None
    assert "memory limit" in victim.crash_reason
    assert bystander.commands.run("echo alive").stdout == "alive\n"
    victim.kill()
    for d in layout.group_dirs(victim.id):
        assert not d.exists()
