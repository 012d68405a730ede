"""Machine configuration: frozen, validated values. Invalid input raises ``ConfigError``
when the value is constructed, before anything is started or written."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError, check_int
from .guest.protocol import GUEST_HOME
from .network import NetworkConfig

MIN_MEMORY_MIB = 64
"""Below this the guest kernel plus the Python agent does not come up reliably."""
MAX_MEMORY_MIB = 64 * 1024
MAX_VCPUS = 16
"""The guest kernel is built with CONFIG_NR_CPUS=16."""
DRIVE_FORMATS = ("raw", "qcow2")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def validate_env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    """Check environment names and values; returns a read-only copy."""
    if env is None:
        return MappingProxyType({})
    if not isinstance(env, Mapping):
        raise ConfigError(f"env must be a mapping of str to str, got {type(env).__name__}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ConfigError(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"environment variable {key} must be a string without NUL bytes")
        out[key] = value
    return MappingProxyType(out)


_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def validate_user(user: str | None) -> str | None:
    """An account name for a call's ``user=`` (None: the template's default user)."""
    if user is None:
        return None
    if not isinstance(user, str) or not _USER_NAME.fullmatch(user):
        raise ConfigError(
            f"user must be an account name ([a-z_][a-z0-9_-]*, at most 32 characters), got {user!r}"
        )
    return user


def guest_home(user: str) -> str:
    """The home of a guest account, which relative guest paths of its calls are under:
    ``/root`` for root, ``/home/NAME`` for any other (as ``useradd -m`` makes it)."""
    return GUEST_HOME if user == "root" else f"/home/{user}"


def validate_guest_path(path: str, what: str = "path") -> str:
    """An absolute, normalized guest path without NUL bytes or '..' components."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"{what} must be an absolute path, got {path!r}")
    if "\0" in path:
        raise ConfigError(f"{what} must not contain NUL bytes")
    if ".." in path.split("/"):
        raise ConfigError(f"{what} must not contain '..' components, got {path!r}")
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/")  # POSIX keeps a leading "//"; we do not


def resolve_guest_path(path: str, what: str = "path", home: str = GUEST_HOME) -> str:
    """A guest path as people type it: absolute, or relative to ``home``, the home of the
    account the call runs as (``"data.csv"`` is ``/home/user/data.csv`` for ``user``,
    ``"."`` the home itself). Normalized, as ``validate_guest_path``."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what} must be a non-empty string, got {path!r}")
    if "\0" in path:
        raise ConfigError(f"{what} must not contain NUL bytes")
    if ".." in path.split("/"):
        raise ConfigError(f"{what} must not contain '..' components, got {path!r}")
    return validate_guest_path(posixpath.join(home, path), what)


def check_guest_path(path: str, what: str = "path") -> str:
    """``resolve_guest_path``'s checks, a relative path kept relative (normalized): for a
    client whose server resolves it against the home of the call's user."""
    resolved = resolve_guest_path(path, what)
    path = os.fspath(path)
    return resolved if path.startswith("/") else posixpath.normpath(path)


@dataclass(frozen=True, slots=True)
class Drive:
    """An extra block device from a host image file, mounted in the guest at ``mount``.

    The file must exist. With ``read_only`` the VMM opens it read-only and the guest
    mounts it read-only; otherwise guest writes go straight to the file.
    """

    path: str | os.PathLike[str]
    mount: str
    read_only: bool = False
    format: str = "raw"
    fstype: str = "ext4"

    def __post_init__(self) -> None:
        try:
            resolved = Path(self.path).expanduser().resolve()
        except (TypeError, OSError) as exc:
            raise ConfigError(f"invalid drive path {self.path!r}: {exc}") from exc
        if not resolved.is_file():
            raise ConfigError(f"drive file {str(self.path)!r} does not exist or is not a file")
        if not os.access(resolved, os.R_OK if self.read_only else os.R_OK | os.W_OK):
            raise ConfigError(f"drive file {str(resolved)!r} is not accessible")
        mount = validate_guest_path(self.mount, "drive mount point")
        if mount == "/":
            raise ConfigError("a drive cannot be mounted on /")
        if self.format not in DRIVE_FORMATS:
            raise ConfigError(f"drive format must be one of {DRIVE_FORMATS}, got {self.format!r}")
        if not isinstance(self.fstype, str) or not re.fullmatch(r"[a-z0-9]+", self.fstype):
            raise ConfigError(f"invalid file system type {self.fstype!r}")
        object.__setattr__(self, "path", str(resolved))
        object.__setattr__(self, "mount", mount)
        object.__setattr__(self, "read_only", bool(self.read_only))


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """What the VM looks like: CPUs, memory, extra drives and the environment of commands."""

    vcpus: int = 1
    memory_mib: int = 256
    drives: tuple[Drive, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.network, NetworkConfig):
            raise ConfigError("network must be a NetworkConfig")
        check_int("vcpus", self.vcpus, 1, MAX_VCPUS)
        check_int("memory_mib", self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)
        drives = tuple(self.drives) if isinstance(self.drives, Sequence) else None
        if drives is None or not all(isinstance(d, Drive) for d in drives):
            raise ConfigError("drives must be a sequence of Drive")
        mounts = [d.mount for d in drives]
        if len(set(mounts)) != len(mounts):
            raise ConfigError(f"two drives share a mount point: {mounts}")
        object.__setattr__(self, "drives", drives)
        object.__setattr__(self, "env", validate_env(self.env))

    def to_json(self) -> dict[str, Any]:
        return {
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "drives": [
                {
                    "path": str(d.path),
                    "mount": d.mount,
                    "read_only": d.read_only,
                    "format": d.format,
                    "fstype": d.fstype,
                }
                for d in self.drives
            ],
            "env": dict(self.env),
            "network": self.network.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MachineConfig:
        """What ``to_json`` wrote (a sandbox's record): validated again (``ConfigError``)."""
        return cls(
            vcpus=data["vcpus"],
            memory_mib=data["memory_mib"],
            drives=tuple(Drive(**d) for d in data["drives"]),
            env=data["env"],
            network=NetworkConfig.from_json(data["network"]),
        )


MAX_LIFETIME = 30 * 24 * 3600.0


def validate_timeout(seconds: float | None) -> float | None:
    """A call's timeout: positive seconds, or None (no limit)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {seconds!r}")
    return seconds


def validate_byte_count(value: int | None, name: str) -> int | None:
    """A limit in bytes: a non-negative integer, or None (no limit)."""
    return None if value is None else check_int(f"{name} (bytes, or None)", value, 0)


def validate_lifetime(seconds: float | None) -> float | None:
    """A sandbox lifetime: positive seconds up to MAX_LIFETIME, or None (no limit)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ConfigError(f"timeout must be a number of seconds or None, got {seconds!r}")
    if not 0 < seconds <= MAX_LIFETIME:
        raise ConfigError(f"timeout must be between 0 and {MAX_LIFETIME:.0f} s, got {seconds}")
    return float(seconds)
