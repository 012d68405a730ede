"""How much of the host one VMM may take: the memory it is admitted with, the control
group limits it runs under, and the resource limits set on its process. The three
memory overheads (beyond the guest's own RAM) are named together here because each
answers a different question."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Mapping

from ..errors import ConfigError, HostMemoryExhausted, ProviderError

ADMISSION_OVERHEAD_MIB = 128
"""Admission: host memory a VMM is expected to need beyond its guest's RAM (code cache,
devices, I/O) when deciding whether the host has room for one more sandbox."""
CGROUP_OVERHEAD_MIB = 256
"""Control group: what a VMM may use beyond its guest's RAM before the kernel's OOM
killer ends it: the TCG code cache (32 MiB), QEMU's heap, and page cache for its
overlay and log. Above the admission estimate, so a normal VMM never meets it."""
ADDRESS_SPACE_OVERHEAD_MIB = 4096
"""Address space (RLIMIT_AS): virtual memory a VMM may map beyond its guest's RAM
(thread stacks, libraries, reserved but untouched regions)."""

DEFAULT_RESERVE_MIB = 512
"""Host memory left free for everything else; ``NOVASANDBOX_MEMORY_RESERVE_MIB`` sets it."""
VMM_MAX_OPEN_FILES = 1024


def available_memory_mib(meminfo: str | None = None) -> int:
    """The host's MemAvailable, in MiB."""
    if meminfo is None:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise ProviderError("no MemAvailable in /proc/meminfo")


def admit(memory_mib: int, available_mib: int, reserve_mib: int) -> None:
    """Refuse a VM whose guest could use up the memory the host has left. Pure."""
    needed = memory_mib + ADMISSION_OVERHEAD_MIB
    if available_mib - needed < reserve_mib:
        raise HostMemoryExhausted(
            f"not enough host memory for a {memory_mib} MiB sandbox: {available_mib} MiB "
            f"available, {needed} MiB needed and {reserve_mib} MiB kept in reserve "
            "(NOVASANDBOX_MEMORY_RESERVE_MIB)"
        )


def reserve_mib(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get("NOVASANDBOX_MEMORY_RESERVE_MIB", "")
    try:
        return int(raw) if raw else DEFAULT_RESERVE_MIB
    except ValueError:
        raise ConfigError(
            f"NOVASANDBOX_MEMORY_RESERVE_MIB must be an integer, got {raw!r}"
        ) from None


def limit_vmm(pid: int, memory_mib: int) -> None:
    """Resource limits on a started VMM: no core dumps (they would hold guest memory),
    a bounded number of open files, and an address space sized to its guest."""
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: VMM_MAX_OPEN_FILES,
        resource.RLIMIT_AS: (memory_mib + ADDRESS_SPACE_OVERHEAD_MIB) << 20,
    }
    for which, value in limits.items():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            resource.prlimit(pid, which, (value, value))
