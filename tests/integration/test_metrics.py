"""``sb.get_metrics()`` on real VMs, local (restored, cold) and through a server: the
figures are the guest's own and move with what runs in it; ``novasandbox ls`` shows them
(locally the VMM's memory, through a server all of them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from novasandbox import CommandHandle, Sandbox, SandboxMetrics, SandboxNotRunning

from .conftest import SandboxFactory
from .served import RemoteServer

pytestmark = pytest.mark.integration

MIB = 1 << 20
LOCAL_CLI = [sys.executable, "-m", "novasandbox.cli"]
ENTRY = [sys.executable, "-m", "novasandbox_entry"]
"""The console script's module: through a server, ``ls`` runs in ``novasandbox_servercli``."""


@pytest.fixture(scope="module")
def sb(sandbox: Sandbox) -> Sandbox:
    """Every test here runs local (restored, cold) and remote (through a server)."""
    return sandbox


def guest_int(sb: Sandbox, cmd: str) -> int:
    return int(sb.commands.run(cmd, user="root").stdout.split()[0])


def started(sb: Sandbox, cmd: str | list[str], ready: str = "ready") -> CommandHandle:
    """Start ``cmd`` and wait until it printed ``ready``."""
    seen = threading.Event()
    out: list[str] = []

    def on_stdout(text: str) -> None:
        out.append(text)
        if ready in "".join(out):
            seen.set()

    handle = sb.commands.start(cmd, on_stdout=on_stdout, timeout=300)
    if not seen.wait(120):
        handle.kill()
        raise AssertionError(f"{cmd!r} did not get ready: {''.join(out)!r}")
    return handle


def test_the_figures_are_the_guests(sb: Sandbox) -> None:
    m = sb.get_metrics()
    assert isinstance(m, SandboxMetrics)
    assert m.cpu_count == guest_int(sb, "nproc") == sb.commands.run("nproc").stdout.count("\n")
    assert m.mem_total == guest_int(sb, "awk '/^MemTotal:/ {print $2 * 1024}' /proc/meminfo")
    assert m.disk_total == guest_int(sb, "df -B1 --output=size / | tail -1")
    assert 0 < m.mem_used < m.mem_total
    assert 0 < m.disk_used < m.disk_total
    assert 0.0 <= m.cpu_used_pct <= 100.0
    # the VMM's host memory: QEMU itself is more than 10 MiB, and the guest's touched
    # memory is in it (less what a restore maps but the guest never touched)
    assert m.vmm_rss is not None and m.vmm_rss > 10 * MIB


def test_memory_in_use_rises_with_an_allocation_and_falls_after(sb: Sandbox) -> None:
    before = sb.get_metrics().mem_used
    hog = started(
        sb,
        [
            "python3",
            "-c",
            "import time\nb = b'x' * (64 << 20)\nprint('ready', flush=True)\ntime.sleep(300)",
        ],
    )
    try:
        during = sb.get_metrics().mem_used
    finally:
        hog.kill()
        hog.wait()
    assert during - before >= 56 * MIB, (before, during)
    after = sb.get_metrics().mem_used
    assert during - after >= 48 * MIB, (during, after)


def test_disk_use_rises_with_a_50_mb_file_and_falls_after(sb: Sandbox) -> None:
    before = sb.get_metrics().disk_used
    r = sb.commands.run("head -c 50000000 /dev/zero > big.bin && sync && stat -c %s big.bin")
    assert r.stdout == "50000000\n", r.stderr
    during = sb.get_metrics().disk_used
    sb.commands.run("rm big.bin && sync")
    after = sb.get_metrics().disk_used
    assert during - before >= 48_000_000, (before, during)
    assert during - after >= 48_000_000, (during, after)


def test_cpu_use_is_high_while_every_vcpu_is_busy(sb: Sandbox) -> None:
    spin = (
        # no timeout(1): it would leave the process group that kill() kills
        "for i in $(seq $(nproc)); do sh -c 'while :; do :; done' & done; echo ready; wait"
    )
    busy = started(sb, spin)
    try:
        sb.get_metrics()  # the start of the next one's window
        m = sb.get_metrics()
    finally:
        busy.kill()
        busy.wait()
    assert m.cpu_used_pct >= 60.0, m


# ---------------------------------------------------------------------------- not running


@pytest.fixture(params=["local", "remote"])
def another(request: pytest.FixtureRequest, factory: SandboxFactory) -> Iterator[Sandbox]:
    if request.param == "remote":
        server: RemoteServer = request.getfixturevalue("remote_server")
        yield server.create()
    else:
        yield factory.create()


def test_a_paused_or_killed_sandbox_raises_its_typed_error(another: Sandbox) -> None:
    another.pause()
    with pytest.raises(SandboxNotRunning) as info:
        another.get_metrics()
    assert info.value.code == "sandbox-not-running"
    another.resume()
    assert another.get_metrics().mem_total > 0
    another.kill()
    with pytest.raises(SandboxNotRunning) as info:
        another.get_metrics()
    assert info.value.code == "sandbox-not-running"


# ---------------------------------------------------------------------------- the CLI


def run_cli(argv: list[str], *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or os.environ.copy(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_local_ls_shows_the_vmm_memory_of_a_sandbox_of_another_process(
    factory: SandboxFactory,
) -> None:
    """``ls`` runs in a process of its own: it reads each VMM's RSS from /proc; the
    guest's figures stay with the sandbox's owner (this process)."""
    mine = factory.create()
    listed = {e["id"]: e for e in json.loads(run_cli(LOCAL_CLI, "ls", "--json"))}
    rss = listed[mine.id]["vmm_rss"]
    assert isinstance(rss, int) and rss > 10 * MIB
    own = mine.get_metrics().vmm_rss
    assert own is not None and own > 10 * MIB
    table = run_cli(LOCAL_CLI, "ls").splitlines()
    assert any("vmm rss" in line for line in table[:3]), table
    row = next(line for line in table if mine.id in line)
    assert "MiB" in row.rsplit("│", 2)[-2]  # the last column: vmm rss
    mine.kill()
    listed = {e["id"]: e for e in json.loads(run_cli(LOCAL_CLI, "ls", "--json", "--all"))}
    assert mine.id not in listed or listed[mine.id]["vmm_rss"] is None


def columns(header: str, rows: list[str], sandbox_id: str) -> dict[str, str]:
    """The cells of ``sandbox_id``'s row of a table whose columns are left-aligned under
    their names."""
    names = ["id", "template", "state", "vcpus", "memory", "boot", "expires in", "cpu"]
    names += ["mem used", "disk used", "vmm rss", "labels"]
    starts = [re.search(rf"(?<!\S){n}(?!\S)", header).start() for n in names]  # type: ignore[union-attr]
    assert starts == sorted(starts), header
    row = next(r for r in rows if r.startswith(sandbox_id + " "))
    ends = [*starts[1:], None]
    return {n: row[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}


def test_ls_through_a_server_shows_every_running_sandboxs_metrics(
    remote_server: RemoteServer,
) -> None:
    running = remote_server.create()
    paused = remote_server.create()
    paused.pause()
    env = {
        **os.environ,
        "NOVASANDBOX_SERVER": remote_server.url,
        "NOVASANDBOX_API_KEY": remote_server.key,
    }
    listed = {s["id"]: s for s in json.loads(run_cli(ENTRY, "ls", "--json", env=env))}
    m = listed[running.id]["metrics"]
    assert set(m) == set(SandboxMetrics.__dataclass_fields__)
    assert m["cpu_count"] >= 1 and 0 < m["mem_used"] < m["mem_total"]
    assert 0 < m["disk_used"] < m["disk_total"] and m["vmm_rss"] > 10 * MIB
    assert listed[paused.id]["metrics"] is None  # a paused guest cannot answer

    header, *rows = run_cli(ENTRY, "ls", env=env).splitlines()
    cells = columns(header, rows, running.id)
    assert cells["state"] == "running" and cells["cpu"].endswith("%")
    for name, total in (("mem used", m["mem_total"]), ("disk used", m["disk_total"])):
        used, _, whole = cells[name].removesuffix(" MiB").partition("/")
        assert int(used) > 0 and int(whole) == round(total / MIB), cells
    assert cells["vmm rss"].endswith(" MiB") and int(cells["vmm rss"][:-4]) > 10
    cells = columns(header, rows, paused.id)
    assert cells["state"] == "paused"
    assert [cells[n] for n in ("cpu", "mem used", "disk used", "vmm rss")] == ["-"] * 4
    paused.kill()
    running.kill()
