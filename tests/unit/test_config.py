"""MachineConfig and Drive: validated when constructed, frozen afterwards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from novasandbox.config import (
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    MIN_MEMORY_MIB,
    Drive,
    MachineConfig,
    resolve_guest_path,
    validate_byte_count,
)
from novasandbox.errors import ConfigError, check_int


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "data.img"
    path.write_bytes(b"\0" * 4096)
    return path


def assert_config_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        MachineConfig(**kwargs)
    assert info.value.code == "invalid-config"
    return info.value


def assert_drive_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Drive(**kwargs)
    assert info.value.code == "invalid-config"
    return info.value


# ---------------------------------------------------------------------------- machine


def test_defaults_are_valid() -> None:
    cfg = MachineConfig()
    assert (cfg.vcpus, cfg.memory_mib, cfg.drives, dict(cfg.env)) == (1, 256, (), {})


@pytest.mark.parametrize("vcpus", [0, -1, MAX_VCPUS + 1, 1000])
def test_vcpus_out_of_range(vcpus: int) -> None:
    assert "vcpus" in str(assert_config_error(vcpus=vcpus))


@pytest.mark.parametrize("vcpus", [True, False, 2.0, "2", None])
def test_vcpus_must_be_a_real_int(vcpus: Any) -> None:
    assert_config_error(vcpus=vcpus)


@pytest.mark.parametrize("vcpus", [1, MAX_VCPUS])
def test_vcpus_bounds_are_inclusive(vcpus: int) -> None:
    assert MachineConfig(vcpus=vcpus).vcpus == vcpus


@pytest.mark.parametrize("memory", [0, MIN_MEMORY_MIB - 1, MAX_MEMORY_MIB + 1])
def test_memory_out_of_range(memory: int) -> None:
    assert "memory_mib" in str(assert_config_error(memory_mib=memory))


@pytest.mark.parametrize("memory", [True, 256.0, "256"])
def test_memory_must_be_a_real_int(memory: Any) -> None:
    assert_config_error(memory_mib=memory)


def test_memory_bounds_are_inclusive() -> None:
    assert MachineConfig(memory_mib=MIN_MEMORY_MIB).memory_mib == MIN_MEMORY_MIB
    assert MachineConfig(memory_mib=MAX_MEMORY_MIB).memory_mib == MAX_MEMORY_MIB


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A=B", "Ä", "A\0"])
def test_bad_env_names(name: str) -> None:
    assert_config_error(env={name: "x"})


@pytest.mark.parametrize("value", ["a\0b", "\0", 1, None, b"bytes"])
def test_bad_env_values(value: Any) -> None:
    assert_config_error(env={"NAME": value})


def test_env_must_be_a_mapping() -> None:
    assert_config_error(env=[("A", "1")])


def test_env_is_a_read_only_copy() -> None:
    source = {"A": "1", "_B2": "x=y", "EMPTY": ""}
    cfg = MachineConfig(env=source)
    source["A"] = "changed"
    assert dict(cfg.env) == {"A": "1", "_B2": "x=y", "EMPTY": ""}
    with pytest.raises(TypeError):
        cfg.env["A"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        del cfg.env["A"]  # type: ignore[attr-defined]


def test_config_is_frozen() -> None:
    cfg = MachineConfig(vcpus=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vcpus = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.env = {}  # type: ignore[misc]
    assert cfg.vcpus == 2


def test_there_are_no_kernel_args() -> None:
    """Nothing public set them: the kernel command line is NovaSandbox's own."""
    with pytest.raises(TypeError):
        MachineConfig(kernel_args=("loglevel=3",))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "lo", "hi"),
    [
        (0, 1, 5),
        (6, 1, 5),
        (-1, 0, None),
        (True, 0, 5),
        (False, 0, 5),
        (2.0, 1, 5),
        ("3", 1, 5),
        (None, 1, 5),
        (2**70, 1, 5),
    ],
)
def test_check_int_refuses(value: Any, lo: int, hi: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        check_int("the count", value, lo, hi)
    assert info.value.code == "invalid-config"
    assert str(info.value).startswith("the count must be an integer ")
    assert repr(value) in str(info.value)


def test_byte_counts() -> None:
    assert validate_byte_count(None, "max_size") is None
    assert validate_byte_count(0, "max_size") == 0
    for bad in (-1, True, 1.5, "10"):
        with pytest.raises(ConfigError, match="max_size"):
            validate_byte_count(bad, "max_size")  # type: ignore[arg-type]


def test_check_int_bounds_are_inclusive() -> None:
    assert check_int("n", 1, 1, 5) == 1
    assert check_int("n", 5, 1, 5) == 5
    assert check_int("n", 10**9, 0) == 10**9
    with pytest.raises(ConfigError, match="from 1 to 5, got 9"):
        check_int("n", 9, 1, 5)
    with pytest.raises(ConfigError, match="of at least 0, got -1"):
        check_int("n", -1, 0)


# ---------------------------------------------------------------------------- drives


def test_valid_drive_is_normalized_and_frozen(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image.parent)
    drive = Drive(image.name, "/mnt//data/./x/", read_only=1)  # type: ignore[arg-type]
    assert drive.path == str(image.resolve())
    assert drive.mount == "/mnt/data/x"
    assert drive.read_only is True
    assert (drive.format, drive.fstype) == ("raw", "ext4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        drive.mount = "/other"  # type: ignore[misc]


def test_missing_drive_file(tmp_path: Path) -> None:
    err = assert_drive_error(path=tmp_path / "nope.img", mount="/data")
    assert "nope.img" in str(err)


def test_drive_path_that_is_a_directory(tmp_path: Path) -> None:
    assert_drive_error(path=tmp_path, mount="/data")


@pytest.mark.parametrize("mount", ["data", "./data", "", "mnt/x"])
def test_relative_mount_point(image: Path, mount: str) -> None:
    assert_drive_error(path=image, mount=mount)


@pytest.mark.parametrize("mount", ["/mnt/../etc", "/..", "/a/b/..", "/../x"])
def test_dotdot_in_mount_point(image: Path, mount: str) -> None:
    assert "'..'" in str(assert_drive_error(path=image, mount=mount))


@pytest.mark.parametrize("mount", ["/", "/.", "/./"])
def test_mount_on_root(image: Path, mount: str) -> None:
    assert_drive_error(path=image, mount=mount)


def test_mount_with_nul(image: Path) -> None:
    assert_drive_error(path=image, mount="/mnt/a\0b")


@pytest.mark.parametrize("fmt", ["qcow", "RAW", "vmdk", ""])
def test_invalid_drive_format(image: Path, fmt: str) -> None:
    assert "format" in str(assert_drive_error(path=image, mount="/data", format=fmt))


def test_qcow2_format_is_accepted(image: Path) -> None:
    assert Drive(image, "/data", format="qcow2").format == "qcow2"


@pytest.mark.parametrize("fstype", ["", "ext4;rm", "EXT4", "ext 4"])
def test_invalid_fstype(image: Path, fstype: str) -> None:
    assert_drive_error(path=image, mount="/data", fstype=fstype)


def test_duplicate_mounts(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\0")
    # the same mount point spelled differently is still the same mount point
    drives = (Drive(image, "/data"), Drive(other, "/data/"))
    assert "mount point" in str(assert_config_error(drives=drives))


def test_drives_must_be_drive_objects(image: Path) -> None:
    assert_config_error(drives=[str(image)])
    assert_config_error(drives=Drive(image, "/data"))


def test_machine_with_drives(image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"\0")
    drives = [Drive(image, "/a"), Drive(other, "/b", read_only=True)]
    cfg = MachineConfig(drives=drives)  # type: ignore[arg-type]
    assert cfg.drives == tuple(drives)
    assert isinstance(cfg.drives, tuple)


# ---------------------------------------------------------------------------- regressions
# Each of these once failed against a real bug (found by these tests, since fixed).


def test_env_name_with_trailing_newline_is_refused() -> None:
    assert_config_error(env={"A\n": "x"})


def test_fstype_with_trailing_newline_is_refused(image: Path) -> None:
    assert_drive_error(path=image, mount="/data", fstype="ext4\n")


def test_mount_on_double_slash_root(image: Path) -> None:
    assert_drive_error(path=image, mount="//")


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        ("data.csv", "/root/data.csv"),
        (".", "/root"),
        ("./a/b/", "/root/a/b"),
        ("sub//x.txt", "/root/sub/x.txt"),
        ("/etc/hostname", "/etc/hostname"),
        (Path("notes.md"), "/root/notes.md"),
    ],
)
def test_relative_guest_paths_are_under_the_home(given: Any, resolved: str) -> None:
    assert resolve_guest_path(given) == resolved
    assert resolve_guest_path(given, home="/home/user").startswith(
        "/home/user" if not str(given).startswith("/") else "/"
    )


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/../../b", "a\0b", 3, None])
def test_bad_guest_paths_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigError):
        resolve_guest_path(bad)
