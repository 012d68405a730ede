"""Adoption: a sandbox created ``adoptable=True`` outlives its owner process and another
process takes it over (``Sandbox.adopt``): what a restarted server does. Real VMs; the
owner is a real process, SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novasandbox import Sandbox, SandboxNotFound, SandboxOwned, SandboxState
from novasandbox.gc import reap
from novasandbox.records import list_sandboxes, sandboxes_dir

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration

OWNER = """
import sys, time
from novasandbox import Sandbox
sb = Sandbox.create(adoptable=sys.argv[1] == "1", timeout=float(sys.argv[2]), env={"MINE": "yes"})
sb.files.write("/home/user/marker", "written by the first owner")
print(sb.id, flush=True)
time.sleep(600)
"""


class Owner:
    def __init__(self, adoptable: bool = True, lifetime: float = 120) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", OWNER, "1" if adoptable else "0", str(lifetime)],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        assert self.proc.stdout is not None
        self.id = self.proc.stdout.readline().strip()
        assert self.id.startswith("sb-"), "the owner did not create its sandbox"

    def die(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def owners() -> Iterator[list[Owner]]:
    made: list[Owner] = []
    yield made
    for owner in made:
        if owner.proc.poll() is None:
            owner.die()
    reap()  # what the owners left that no test adopted


def info_of(sandbox_id: str) -> dict[str, object]:
    [info] = [i for i in list_sandboxes() if i.id == sandbox_id]
    return info.to_json()


def test_a_sandbox_outlives_its_owner_and_is_adopted(
    owners: list[Owner], factory: SandboxFactory
) -> None:
    owner = Owner()
    owners.append(owner)
    with pytest.raises(SandboxOwned):  # its owner still runs
        Sandbox.adopt(owner.id)
    owner.die()
    assert info_of(owner.id)["alive"] is True
    listed = subprocess.run(
        [sys.executable, "-m", "novasandbox.cli", "ls", "--json"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=True,
    )
    [row] = [r for r in json.loads(listed.stdout) if r["id"] == owner.id]
    assert row["orphaned"] is True and row["adoptable"] is True
    assert owner.id not in reap()  # not reaped: it waits to be adopted
    assert info_of(owner.id)["alive"] is True

    sb = factory.track(Sandbox.adopt(owner.id))
    assert sb.id == owner.id and sb.state is SandboxState.RUNNING and sb.restored
    assert sb.files.read("/home/user/marker") == "written by the first owner"
    assert sb.commands.run("echo $MINE").stdout == "yes\n"  # its environment came along
    sb.files.write("/home/user/second", "and by the second")
    assert sb.commands.run("cat /home/user/second").stdout == "and by the second"
    assert info_of(owner.id)["owner_pid"] == os.getpid()
    with pytest.raises(SandboxOwned):
        Sandbox.adopt(owner.id)  # ... nor twice
    pid = int(info_of(owner.id)["pid"])  # type: ignore[arg-type]
    sb.kill()
    assert sb.state is SandboxState.KILLED
    assert not (sandboxes_dir() / owner.id).exists()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or owner.id.encode() not in cmdline.read_bytes()


def test_an_adopted_sandbox_keeps_its_lifetime(
    owners: list[Owner], factory: SandboxFactory
) -> None:
    owner = Owner(lifetime=10)
    owners.append(owner)
    owner.die()
    sb = factory.track(Sandbox.adopt(owner.id))
    deadline = sb._inner.deadline
    assert deadline is not None and deadline < time.time() + 10
    while sb.state is not SandboxState.KILLED:
        assert time.time() < deadline + 10, "the lifetime did not end it"
        time.sleep(0.2)
    assert sb.expired
    assert not (sandboxes_dir() / owner.id).exists()


def test_what_cannot_be_adopted(owners: list[Owner]) -> None:
    with pytest.raises(SandboxNotFound):
        Sandbox.adopt("sb-0000000000")
    with pytest.raises(SandboxNotFound):
        Sandbox.adopt("../etc")
    plain = Owner(adoptable=False)
    owners.append(plain)
    plain.die()
    with pytest.raises(SandboxOwned):  # not created adoptable: reaped instead
        Sandbox.adopt(plain.id)
    assert plain.id in reap()
    gone = Owner()
    owners.append(gone)
    gone.die()
    vmm = int(info_of(gone.id)["pid"])  # type: ignore[arg-type]
    os.kill(vmm, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while info_of(gone.id)["alive"] and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(SandboxNotFound):  # its VM is gone: released instead
        Sandbox.adopt(gone.id)
    assert not (sandboxes_dir() / gone.id).exists()
