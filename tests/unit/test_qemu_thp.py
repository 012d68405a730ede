"""NOVASANDBOX_QEMU_THP=0: the VMMs are started without transparent huge pages; the
starting process keeps them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from novasandbox.vm import qemu


def thp_enabled(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    pytest.fail("no THP_enabled line in /proc/PID/status")


def spawn_and_read() -> str:
    child = subprocess.Popen(["sleep", "5"])
    try:
        return thp_enabled(child.pid)
    finally:
        child.kill()
        child.wait()


def test_children_spawned_inside_have_no_huge_pages_and_the_flag_is_cleared_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOVASANDBOX_QEMU_THP", "0")
    assert qemu._LIBC.prctl(qemu.PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0
    before = spawn_and_read()  # "1" where the kernel has THP at all
    with qemu.no_huge_pages():
        with qemu.no_huge_pages():  # nested/concurrent spawns: the last one clears it
            assert spawn_and_read() == "0"
        assert spawn_and_read() == "0"
    assert qemu._LIBC.prctl(qemu.PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0
    assert spawn_and_read() == before


@pytest.mark.parametrize("value", [None, "1"])
def test_by_default_huge_pages_stay(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    before = spawn_and_read()
    if value is None:
        monkeypatch.delenv("NOVASANDBOX_QEMU_THP", raising=False)
    else:
        monkeypatch.setenv("NOVASANDBOX_QEMU_THP", value)
    with qemu.no_huge_pages():
        assert spawn_and_read() == before
