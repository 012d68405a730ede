"""Bad input gets a typed error and leaves nothing running or on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from novasandbox import (
    ConfigError,
    Drive,
    NovaSandboxError,
    Sandbox,
    TemplateNotFound,
    VMStartError,
)

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kwargs", "error", "code"),
    [
        ({"template": "no-such-template"}, TemplateNotFound, "template-not-found"),
        ({"vcpus": 0}, ConfigError, "invalid-config"),
        ({"memory_mib": 16}, ConfigError, "invalid-config"),
        ({"env": {"BAD NAME": "x"}}, ConfigError, "invalid-config"),
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
    with pytest.raises(NovaSandboxError) as info:
        Sandbox.create(drives=[Drive(junk, mount="/junk", read_only=True)])
    assert "mount" in str(info.value)
    assert_no_leftovers(state_root)
