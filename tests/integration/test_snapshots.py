"""Snapshots on real VMs: restore by default, identity of clones, pause/resume, user
snapshots with files and processes, forks, and nothing lost across cycles."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novasandbox import (
    ConfigError,
    Drive,
    Sandbox,
    SandboxNotRunning,
    SandboxState,
    Snapshot,
    SnapshotError,
    SnapshotNotFound,
    delete_snapshot,
    list_snapshots,
)

from .conftest import SandboxFactory, assert_no_leftovers

pytestmark = pytest.mark.integration


def sha256_in(sb: Sandbox, path: str) -> str:
    return sb.commands.run(["sha256sum", path], check=True).stdout.split()[0]


def write_random(sb: Sandbox, path: str, size: int = 1 << 20) -> str:
    data = os.urandom(size)
    sb.files.write(path, data)
    return hashlib.sha256(data).hexdigest()


def test_default_create_restores_and_cold_boots_on_request(factory: SandboxFactory) -> None:
    restored = factory.create()
    cold = factory.create(cold=True)
    assert restored.restored and restored.source_snapshot is not None
    assert restored.source_snapshot.kind == "template"
    assert not cold.restored
    for sb in (restored, cold):
        steps = [sb.timings[k] for k in ("vmm_started", "agent_connected", "agent_answered")]
        assert 0 < steps[0] <= steps[1] <= steps[2] <= sb.timings["ready"]
        assert sb.commands.run(["uname", "-r"]).stdout.strip().endswith("-novasandbox")


def test_restored_guests_keep_the_tsc_clock_and_report_their_hello(
    factory: SandboxFactory,
) -> None:
    """The template snapshot's guest runs on the TSC clocksource: a guest that failed to
    calibrate it at boot would be on jiffies in every restored sandbox (4 ms clock
    resolution, a tick every 4 ms when idle)."""
    sb = factory.create()
    assert sb.restored
    clock = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    expected = "tsc" if sb.accel == "tcg" else None
    current = sb.commands.run(["cat", clock], check=True).stdout.strip()
    if expected is not None:  # under KVM the guest picks kvm-clock or tsc itself
        assert current == expected, sb.commands.run("dmesg | grep -i -E 'tsc|clocksource'").stdout
    # the agent's own share of the handshake is measured in the guest and reported
    assert 0 < sb.timings["guest_hello"] < sb.timings["agent_answered"]


def test_snapshots_are_saved_unfrozen_and_a_frozen_one_is_thawed(
    factory: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory and disk are saved at one paused instant, so nothing is frozen for a
    snapshot (and a restore has nothing to thaw). An agent from before the ``sync``
    request answers it "unknown-op": it is frozen as it was then, the snapshot says
    so, and both the source (after the save) and the restored sandbox are thawed."""
    sb = factory.create()
    snap = sb.snapshot()
    try:
        assert not snap.frozen
        assert json.loads((snap.directory / "manifest.json").read_text())["frozen"] is False
    finally:
        delete_snapshot(snap.id)

    from novasandbox.agent_client import AgentClient

    real_call = AgentClient.call

    async def old_agent(self: AgentClient, op: str, /, **kwargs: object) -> object:
        if op == "sync":  # what an agent without the request answers
            return await real_call(self, "no-such-op-before-sync", **kwargs)
        return await real_call(self, op, **kwargs)

    monkeypatch.setattr(AgentClient, "call", old_agent)
    legacy = sb.snapshot()
    monkeypatch.undo()
    try:
        assert legacy.frozen
        sb.files.write("/home/user/after-a-frozen-save", "ok")  # the source was thawed
        clone = factory.create(from_snapshot=legacy)
        clone.files.write("/home/user/written-after-restore", "ok")  # and the clone too
        assert clone.commands.run("cat /home/user/written-after-restore").stdout == "ok"
    finally:
        delete_snapshot(legacy.id)


def test_restored_sandboxes_get_their_own_identity(factory: SandboxFactory) -> None:
    a, b = factory.create(), factory.create()
    probe = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"
    out_a = a.commands.run(probe).stdout.split()
    out_b = b.commands.run(probe).stdout.split()
    assert out_a[0] == a.id and out_b[0] == b.id
    assert out_a[1] != out_b[1], "clones share their RNG state"
    for out in (out_a, out_b):
        assert abs(int(out[2]) - time.time()) < 10, "the guest clock was not set after restore"
    # the root file system is writable (it was never frozen)
    a.files.write("/home/user/written-after-restore", "ok")
    assert a.commands.run("cat /home/user/written-after-restore").stdout == "ok"


def test_pause_and_resume(factory: SandboxFactory) -> None:
    sb = factory.create()
    digest = write_random(sb, "/home/user/before-pause.bin")
    sb.pause()
    assert sb.state is SandboxState.PAUSED
    assert not sb.is_running()
    with pytest.raises(SandboxNotRunning):
        sb.commands.run("true")
    with pytest.raises(SandboxNotRunning):
        sb.pause()
    sb.resume()
    assert sb.state is SandboxState.RUNNING
    assert sha256_in(sb, "/home/user/before-pause.bin") == digest
    with pytest.raises(SandboxNotRunning):
        sb.resume()


def test_snapshot_keeps_files_and_running_processes(factory: SandboxFactory) -> None:
    sb = factory.create()
    digest = write_random(sb, "/home/user/data.bin")
    # a process that keeps state only in memory: it counts, and reports on request
    counter = (
        "import os, signal, sys, time\n"
        "n = 0\n"
        "def publish(path, text):  # atomically: readers never see a half-written file\n"
        "    open(path + '.tmp', 'w').write(text)\n"
        "    os.replace(path + '.tmp', path)\n"
        "def report(*_):\n"
        "    publish('/tmp/count', str(n))\n"
        "signal.signal(signal.SIGUSR1, report)\n"
        "publish('/tmp/counter.pid', str(os.getpid()))\n"
        "while True:\n"
        "    n += 1\n"
        "    time.sleep(0.01)\n"
    )
    sb.commands.start(["python3", "-c", counter], timeout=None)
    deadline = time.monotonic() + 30
    while not sb.files.exists("/tmp/counter.pid"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = sb.files.read("/tmp/counter.pid").strip()
    snap = sb.snapshot()
    assert isinstance(snap, Snapshot)
    assert snap.kind == "user" and snap.source_sandbox == sb.id
    manifest = json.loads((snap.directory / "manifest.json").read_text())
    assert manifest["id"] == snap.id
    assert snap.id in {s.id for s in list_snapshots()}
    # the source goes on working after the save
    assert sb.commands.run("echo still").stdout == "still\n"
    sb.files.write("/home/user/after-snapshot", "not in the snapshot")

    clone = factory.create(from_snapshot=snap)
    assert clone.restored and clone.id != sb.id
    assert sha256_in(clone, "/home/user/data.bin") == digest
    assert not clone.files.exists("/home/user/after-snapshot")
    # the counting process came along, still counting
    assert clone.commands.run(f"kill -USR1 {pid}").exit_code == 0
    deadline = time.monotonic() + 30
    while not clone.files.exists("/tmp/count"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = int(clone.files.read("/tmp/count"))
    time.sleep(0.5)
    clone.commands.run(f"kill -USR1 {pid}", check=True)
    deadline = time.monotonic() + 30
    while int(clone.files.read("/tmp/count")) == first:  # the handler runs soon after
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert int(clone.files.read("/tmp/count")) > first > 0
    delete_snapshot(snap)
    assert snap.id not in {s.id for s in list_snapshots()}
    with pytest.raises(SnapshotNotFound):
        factory.create(from_snapshot=snap)


def test_three_cycles_lose_nothing(factory: SandboxFactory) -> None:
    current = factory.create()
    digests: dict[str, str] = {}
    snaps: list[Snapshot] = []
    try:
        for cycle in range(3):
            path = f"/home/user/cycle{cycle}.bin"
            digests[path] = write_random(current, path)
            snaps.append(current.snapshot())
            current = factory.create(from_snapshot=snaps[-1])
            for known, digest in digests.items():
                assert sha256_in(current, known) == digest, (cycle, known)
    finally:
        for snap in reversed(snaps):  # each is layered on the one before
            delete_snapshot(snap)


def test_fork(factory: SandboxFactory, state_root: Path) -> None:
    parent = factory.create()
    digest = write_random(parent, "/home/user/shared.bin")
    parent.commands.run("echo 41 > /tmp/value", check=True)
    children = [factory.track(c) for c in parent.fork(3)]
    assert len({c.id for c in children} | {parent.id}) == 4
    fork_snapshot = children[0].source_snapshot
    assert fork_snapshot is not None and fork_snapshot.kind == "fork"
    assert fork_snapshot.id not in {s.id for s in list_snapshots()}  # ephemeral
    for i, child in enumerate(children):
        assert sha256_in(child, "/home/user/shared.bin") == digest
        child.files.write("/tmp/value", str(i))
    for i, child in enumerate(children):
        assert child.files.read("/tmp/value") == str(i)
    assert parent.files.read("/tmp/value") == "41\n"
    # children outlive their parent
    parent.kill()
    assert all(c.commands.run("echo alive").stdout == "alive\n" for c in children)
    for child in children[:-1]:
        child.kill()
    assert fork_snapshot.directory.exists()  # the last child still runs from it
    children[-1].kill()
    assert not fork_snapshot.directory.exists()
    assert_no_leftovers(state_root)


def test_snapshots_layered_on_others_keep_them(factory: SandboxFactory) -> None:
    parent = factory.create()
    digest = write_random(parent, "/home/user/base.bin")
    [child] = parent.fork(1)
    factory.track(child)
    fork_snapshot = child.source_snapshot
    assert fork_snapshot is not None
    of_child = child.snapshot()
    child.kill()
    # the fork's snapshot stays: a user snapshot is layered on it
    assert fork_snapshot.directory.exists()
    grandchild = factory.create(from_snapshot=of_child)
    assert sha256_in(grandchild, "/home/user/base.bin") == digest
    second = grandchild.snapshot()
    with pytest.raises(SnapshotError) as info:
        delete_snapshot(of_child)
    assert second.id in str(info.value)
    delete_snapshot(second)
    grandchild.kill()
    delete_snapshot(of_child)
    assert not fork_snapshot.directory.exists()


def test_snapshot_refusals(factory: SandboxFactory, tmp_path: Path) -> None:
    image = tmp_path / "d.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image), "8M"], check=True)
    with_drive = factory.create(drives=[Drive(image, mount="/d", read_only=True)])
    assert not with_drive.restored
    with pytest.raises(SnapshotError):
        with_drive.snapshot()
    sb = factory.create()
    snap = sb.snapshot()
    try:
        with pytest.raises(ConfigError):
            Sandbox.create(from_snapshot=snap, vcpus=2)
        with pytest.raises(ConfigError):
            Sandbox.create(from_snapshot=snap, drives=[Drive(image, mount="/d")])
        with pytest.raises(ConfigError):
            sb.fork(0)
    finally:
        delete_snapshot(snap)


def test_snapshot_cli(factory: SandboxFactory) -> None:
    sb = factory.create()
    snap = sb.snapshot()
    cli = [sys.executable, "-m", "novasandbox.cli", "snapshot"]
    listed = json.loads(subprocess.run([*cli, "ls", "--json"], capture_output=True).stdout)
    assert snap.id in {s["id"] for s in listed}
    r = subprocess.run([*cli, "rm", snap.id], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not snap.directory.exists()
    r = subprocess.run([*cli, "rm", snap.id], capture_output=True, text=True)
    assert r.returncode == 125
    assert "[snapshot-not-found]" in r.stderr
