"""What a VMM may reach on the host: started as root, QEMU drops to a uid of its own and
is chrooted into an empty directory, so it holds only what it opened before."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from novasandbox import Sandbox, TemplateManager
from novasandbox.errors import ProviderError
from novasandbox.providers.base import VMM_ID_BASE, VMM_ID_COUNT
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
                ProviderError, match="Could not open .*(Permission denied|No such file)"
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
    sb.files.write("/root/note", b"kept")
    assert sb.commands.run("sync && cat /root/note").stdout == "kept"
    snap = sb.snapshot()
    try:
        child = factory.create(from_snapshot=snap)
        assert child.files.read("/root/note") == "kept"
        child.files.write("/root/more", b"x" * (1 << 20))
        assert child.commands.run("stat -c %s /root/more").stdout.strip() == str(1 << 20)
    finally:
        for s in list(factory.sandboxes):
            s.kill()
        delete_snapshot(snap)
