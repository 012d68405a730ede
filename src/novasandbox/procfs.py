"""What ``/proc`` says about host processes: a process's identity (pid + start time +
command line, so a reused pid is never taken for the process recorded), its uid, its
resident memory, and the processes whose command line names something. Imports nothing
of the package."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    Stored with the pid so that a later kill can check it is still the same process.
    """
    try:
        with open(PROC / str(pid) / "stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` runs and, if ``start_time`` is known, is still the process that
    started then."""
    start = process_start_time(pid)
    return start is not None and (start_time is None or start == start_time)


def cmdline(pid: int) -> bytes | None:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def same_process(pid: int, start_time: int | None, marker: bytes) -> bool:
    """Whether ``pid`` is the process recorded: same start time, and ``marker`` in its
    command line."""
    if start_time is None or process_start_time(pid) != start_time:
        return False
    line = cmdline(pid)
    return line is not None and marker in line


def process_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (None: gone)."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def process_rss(pid: int) -> int | None:
    """The resident memory of ``pid`` in bytes (VmRSS; None: gone, or a kernel thread)."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def pids_matching(*needles: bytes) -> list[int]:
    """PIDs of live processes whose command line contains every one of ``needles``."""
    pids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        line = cmdline(int(entry.name))
        if line is not None and all(n in line for n in needles):
            pids.append(int(entry.name))
    return pids
