"""Guest faults on real VMs: a kernel panic, a killed or hung agent, a fork bomb, a
memory hog and a full disk. The sandbox may die or report errors; the host and the other
sandboxes keep working, and nothing hangs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from novasandbox import (
    AgentError,
    AgentTimeout,
    Drive,
    NoSpaceLeft,
    NovaSandboxError,
    Sandbox,
    SandboxCrashed,
    SandboxState,
)

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration


def agent_pid(sb: Sandbox) -> int:
    return int(sb._inner._agent.info["pid"])  # type: ignore[union-attr]


class Bystander:
    """A second sandbox running commands in a thread while the victim misbehaves."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.outputs: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                self.outputs.append(self.sb.commands.run(f"echo {n}", timeout=60).stdout)
            except BaseException as exc:
                self.errors.append(exc)
                return
            n += 1

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert self.errors == []
        assert len(self.outputs) >= 1
        assert self.outputs == [f"{i}\n" for i in range(len(self.outputs))]


def test_kernel_panic_is_a_crash_with_its_reason(factory: SandboxFactory) -> None:
    bystander = factory.create()
    sb = factory.create()
    with Bystander(bystander), pytest.raises(SandboxCrashed) as info:
        sb.commands.run("echo c > /proc/sysrq-trigger", timeout=60, user="root")
    assert sb.state is SandboxState.CRASHED
    assert sb.crash_reason is not None and sb.crash_reason.startswith("kernel panic")
    assert "Kernel panic" in info.value.console_tail
    with pytest.raises(SandboxCrashed):
        sb.files.read("/etc/hostname")
    assert bystander.id in {i.id for i in Sandbox.list()}
    sb.kill()
    assert not sb.paths.state_dir.exists()


def test_killed_agent_fails_requests_in_flight_then_comes_back(factory: SandboxFactory) -> None:
    sb = factory.create()
    pid = agent_pid(sb)
    long_running = sb.commands.start("sleep 30", timeout=None)
    with pytest.raises(AgentError):
        sb.commands.run(f"kill -9 {pid}", timeout=30, user="root")
    with pytest.raises(AgentError) as info:
        long_running.wait()
    assert "restarted" in str(info.value)
    # init started a new agent on the same channel
    deadline = time.monotonic() + 60
    while True:
        try:
            assert sb.commands.run("echo back", timeout=30).stdout == "back\n"
            break
        except AgentError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    new_agent = int(sb.commands.run("echo $PPID").stdout)  # commands are the agent's children
    assert new_agent != pid


def test_hung_agent_gives_a_typed_error_not_a_hang(factory: SandboxFactory) -> None:
    sb = factory.create()
    sb.commands.start(f"sleep 0.5; kill -STOP {agent_pid(sb)}", timeout=None, user="root")
    time.sleep(1.5)
    with pytest.raises(AgentTimeout):
        sb.commands.run("true", timeout=1)
    sb.kill()  # the kill does not depend on the agent
    assert sb.state is SandboxState.KILLED


def test_fork_bomb_leaves_the_host_and_other_sandboxes_alone(factory: SandboxFactory) -> None:
    bystander = factory.create()
    sb = factory.create()
    with Bystander(bystander):
        # the bomb's offspring fill the guest (its leader may return or be killed at its
        # timeout). Whatever the victim does (answer slowly, time out, fail), the
        # bystander is unaffected.
        with contextlib.suppress(NovaSandboxError):  # returns, or runs past its timeout
            sb.commands.run(":(){ :|:& };:", timeout=5)
        time.sleep(5)
        with contextlib.suppress(NovaSandboxError):
            sb.commands.run("echo victim", timeout=5)
    sb.kill()
    assert not sb.paths.state_dir.exists()
    assert bystander.commands.run("echo fine").stdout == "fine\n"


def test_memory_hog_meets_the_guest_oom_killer(factory: SandboxFactory) -> None:
    bystander = factory.create()
    sb = factory.create(memory_mib=128)
    with Bystander(bystander):
        r = sb.commands.run(
            ["python3", "-c", "b = [bytearray(1 << 20) for _ in range(4096)]"], timeout=120
        )
    assert r.exit_code != 0  # MemoryError, or SIGKILL from the guest's OOM killer
    assert sb.commands.run("echo survived").stdout == "survived\n"


def test_full_disk_reports_no_space(factory: SandboxFactory, tmp_path: Path) -> None:
    image = tmp_path / "small.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image), "16M"], check=True)
    sb = factory.create(drives=[Drive(image, mount="/small")])
    with pytest.raises(NoSpaceLeft) as info:
        sb.files.write("/small/big.bin", os.urandom(32 << 20), user="root")
    assert info.value.code == "no-space"
    r = sb.commands.run("head -c 32M /dev/zero > /small/more", user="root")
    assert r.exit_code != 0 and "No space left" in r.stderr
    sb.files.remove("/small/big.bin", user="root")
    after = sb.commands.run("echo ok > /small/after && cat /small/after", user="root")
    assert after.stdout == "ok\n"
