"""Lifetimes and orphans on real VMs: expired sandboxes die, and what a SIGKILLed owner
left behind is reaped, with the VMM's identity checked first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from novasandbox import ConfigError, Sandbox, SandboxExpired, SandboxNotRunning, SandboxState
from novasandbox.gc import reap
from novasandbox.records import SandboxInfo, sandboxes_dir, write_record

from .conftest import SandboxFactory, assert_no_leftovers, qemu_processes_under

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "novasandbox.cli"]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_lifetime_ends_the_sandbox(factory: SandboxFactory, state_root: Path) -> None:
    sb = factory.create(timeout=2)
    assert sb.deadline is not None and sb.deadline - time.time() <= 2
    assert sb.commands.run("echo alive").stdout == "alive\n"
    wait_for(lambda: sb.state is SandboxState.KILLED, 30, "the lifetime to end")
    assert not sb.paths.state_dir.exists()
    assert sb.expired
    # every later call says why, with its own code, and names the knobs
    for call in (
        lambda: sb.commands.run("true"),
        lambda: sb.files.read("/etc/hostname"),
        lambda: sb.set_timeout(60),
    ):
        with pytest.raises(SandboxExpired) as info:
            call()
        assert info.value.code == "sandbox-expired"
        assert isinstance(info.value, SandboxNotRunning)
        assert "lifetime (2 s)" in info.value.message
        assert "timeout=" in info.value.message and "set_timeout" in info.value.message
    assert_no_leftovers(state_root)


def test_a_call_in_flight_when_the_lifetime_ends_says_expired(factory: SandboxFactory) -> None:
    sb = factory.create(timeout=3)
    with pytest.raises(SandboxExpired, match="end of its lifetime"):
        sb.commands.run("sleep 60", timeout=None)
    wait_for(lambda: sb.state is SandboxState.KILLED, 10, "the kill to complete")
    assert sb.expired


def test_killed_by_hand_is_not_expired(factory: SandboxFactory) -> None:
    sb = factory.create(timeout=60)
    sb.kill()
    assert not sb.expired
    with pytest.raises(SandboxNotRunning) as info:
        sb.commands.run("true")
    assert not isinstance(info.value, SandboxExpired)
    assert info.value.code == "sandbox-not-running"


def test_set_timeout_extends_and_removes_the_limit(factory: SandboxFactory) -> None:
    sb = factory.create(timeout=2)
    sb.set_timeout(120)
    assert sb.deadline is not None and sb.deadline - time.time() > 100
    time.sleep(3)
    assert sb.commands.run("echo still here").stdout == "still here\n"
    sb.set_timeout(None)
    assert sb.deadline is None
    with pytest.raises(ConfigError):
        sb.set_timeout(-1)
    with pytest.raises(ConfigError):
        Sandbox.create(timeout=0)


OWNER = textwrap.dedent(
    """
    import json, sys, time
    from novasandbox import Sandbox
    boxes = [Sandbox.create(timeout=float(sys.argv[1])) for _ in range(3)]
    print(json.dumps([b.id for b in boxes]), flush=True)
    time.sleep(600)
    """
)


def start_owner(lifetime: float) -> tuple[subprocess.Popen[str], list[str]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(lifetime)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, "the owner process failed before creating its sandboxes"
    return owner, json.loads(line)


def test_gc_reaps_what_a_killed_owner_left(state_root: Path) -> None:
    owner, ids = start_owner(600)
    try:
        assert len(qemu_processes_under(state_root)) == 3
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # the VMs outlive their owner (nothing ran its cleanup) ...
        assert len(qemu_processes_under(state_root)) == 3
        r = subprocess.run([*CLI, "gc"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(line.split()[-1] for line in r.stdout.splitlines()) == sorted(ids)
        # ... until gc: no VMM, overlay, socket or state directory is left
        wait_for(lambda: not qemu_processes_under(state_root), 10, "the VMMs to go")
        assert_no_leftovers(state_root)
    finally:
        owner.kill()
        reap()


def test_guest_powers_off_at_the_end_of_its_lifetime_without_its_owner(
    state_root: Path,
) -> None:
    owner, ids = start_owner(4)
    try:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        # no host process is left to enforce the lifetime: the guest agent does
        wait_for(lambda: not qemu_processes_under(state_root), 60, "the VMs to power off")
        assert sorted(reap()) == sorted(ids)  # what is left on disk goes at the next gc
        assert_no_leftovers(state_root)
    finally:
        owner.kill()
        reap()


def test_next_create_reaps_expired_and_orphaned_entries(factory: SandboxFactory) -> None:
    # a record that claims our own pid as its VMM, but with another start time: a reused
    # pid. Reaping must remove the entry without signalling us.
    directory = sandboxes_dir() / "sb-fakefake00"
    directory.mkdir(parents=True)
    (directory / "rootfs.qcow2").write_bytes(b"stale overlay")
    write_record(
        directory,
        SandboxInfo(
            id="sb-fakefake00",
            template="python",
            state="running",
            pid=os.getpid(),
            pid_start_time=1,
            owner_pid=2**22 + 7,
            created_at=time.time() - 100,
            vcpus=1,
            memory_mib=256,
            accel="tcg",
            state_dir=str(directory),
            deadline=time.time() - 1,
        ),
    )
    sb = factory.create()
    assert not directory.exists()
    assert sb.is_running()  # and the test process is still alive to see it
