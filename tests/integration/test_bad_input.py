"""Bad input gets a typed error and leaves nothing running or on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from novasandbox import (
    ConfigError,
    Drive,
    HostMemoryExhausted,
    NovaSandboxError,
    Sandbox,
    TemplateNotFound,
    VMStartError,
    delete_snapshot,
)
from novasandbox.guest.protocol import ErrorCode

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"template": "no-such-template"}, TemplateNotFound, "template-not-found"),
        ({"vcpus": 0}, ConfigError, "invalid-config"),
        ({"memory_mib": 16}, ConfigError, "invalid-config"),
        ({"env": {"BAD NAME": "x"}}, ConfigError, "invalid-config"),
        # the template snapshot's internal mode is not for users; nor is an unknown one
        ({"network": "detached"}, ConfigError, "invalid-config"),
        ({"network": "bridge"}, ConfigError, "invalid-config"),
        ({"network": "detached", "allow": []}, ConfigError, "invalid-config"),
    ],
)
def test_create_refuses_bad_input(
    kwargs: dict[str, object], error: type[NovaSandboxError], code: str, state_root: Path
) -> None:
    with pytest.raises(error) as info:
        Sandbox.create(**kwargs)  # type: ignore[arg-type]
    assert info.value.code == code
    assert_no_leftovers(state_root)


def test_missing_drive_file_is_refused_before_anything_starts(
    tmp_path: Path, state_root: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        Sandbox.create(drives=[Drive(tmp_path / "missing.ext4", mount="/data")])
    assert "does not exist" in str(info.value)
    assert_no_leftovers(state_root)


def test_failure_mid_create_cleans_up(state_root: Path) -> None:
    """A boot that cannot finish in time: the VM is killed and its state removed."""
    with pytest.raises(VMStartError) as info:
        Sandbox.create(boot_timeout=0.3, cold=True)
    assert info.value.code == "vm-start-failed"
    assert_no_leftovers(state_root)


def test_drive_that_is_not_a_file_system_fails_cleanly(tmp_path: Path, state_root: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(VMStartError) as info:
        Sandbox.create(drives=[Drive(junk, mount="/junk", read_only=True)])
    cause = info.value.__cause__
    assert isinstance(cause, NovaSandboxError) and cause.agent_code is ErrorCode.MOUNT_FAILED
    assert_no_leftovers(state_root)


def test_admission_check_refuses_when_host_memory_would_run_out(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVASANDBOX_MEMORY_RESERVE_MIB", str(1 << 30))
    with pytest.raises(HostMemoryExhausted) as info:
        Sandbox.create()
    assert info.value.code == "host-memory-exhausted"
    assert_no_leftovers(state_root)


def test_vmm_runs_confined(state_root: Path) -> None:
    with Sandbox.create() as sb:
        pid = {i.id: i.pid for i in Sandbox.list()}[sb.id]
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max core file size        0" in limits
        files = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert files.split()[3:5] == ["1024", "1024"]
        # QEMU's seccomp filter is on (mode 2: filter)
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Seccomp:\t2" in status
        assert sb.commands.run("echo limited").stdout == "limited\n"
        # and a snapshot, which QEMU writes to an fd it was handed, still works
        snap = sb.snapshot()
        try:
            assert snap.memory.stat().st_size > 1 << 20
        finally:
            delete_snapshot(snap)
