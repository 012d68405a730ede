"""Sandbox lifecycle on real VMs: state, kill, listing, many at once (threads and asyncio)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from novasandbox import AsyncSandbox, Sandbox, SandboxNotRunning, SandboxState

from .conftest import SandboxFactory, assert_no_leftovers, qemu_processes_under

pytestmark = pytest.mark.integration


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_leaves_nothing_behind(factory: SandboxFactory, state_root: Path) -> None:
    sb = factory.create()
    info = {i.id: i for i in Sandbox.list()}[sb.id]
    assert info.alive and info.pid is not None
    paths = sb.paths
    for path in (paths.agent_socket, paths.control_socket, paths.overlay, paths.console_log):
        assert path.exists(), path
    assert sb.state is SandboxState.RUNNING and sb.is_running()
    first = sb.uptime
    assert sb.commands.run("echo alive").stdout == "alive\n"
    assert sb.uptime > first > 0

    sb.kill()
    assert sb.state is SandboxState.KILLED
    assert not sb.is_running()
    assert not pid_alive(info.pid)
    assert not paths.state_dir.exists()
    assert sb.id not in {i.id for i in Sandbox.list()}
    assert_no_leftovers(state_root)
    sb.kill()  # a second kill is a no-op
    with pytest.raises(SandboxNotRunning):
        sb.commands.run("echo too late")


def test_context_manager_kills(state_root: Path) -> None:
    with Sandbox.create() as sb:
        assert sb.commands.run("hostname").stdout.strip() == sb.id
    assert sb.state is SandboxState.KILLED
    assert_no_leftovers(state_root)


def test_vm_exit_is_seen_as_crashed(factory: SandboxFactory) -> None:
    sb = factory.create()
    pid = {i.id: i for i in Sandbox.list()}[sb.id].pid
    assert pid is not None
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while sb.state is SandboxState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sb.state is SandboxState.CRASHED
    with pytest.raises(SandboxNotRunning):
        sb.commands.run("true")


def test_many_threads_share_one_sandbox(factory: SandboxFactory) -> None:
    sb = factory.create()
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        for j in range(3):
            path = f"/tmp/t{i}-{j}"
            sb.files.write(path, f"{i}:{j}")
            results[i * 10 + j] = sb.commands.run(["cat", path]).stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i * 10 + j: f"{i}:{j}" for i in range(8) for j in range(3)}


def test_ten_sandboxes_from_threads(state_root: Path) -> None:
    sandboxes: list[Sandbox] = []
    outputs: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            sb = Sandbox.create()
            sandboxes.append(sb)
            outputs[i] = sb.commands.run(f"echo {i} $(hostname)").stdout
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        ids = {sb.id for sb in sandboxes}
        assert len(ids) == 10
        assert {out.split()[0] for out in outputs.values()} == {str(i) for i in range(10)}
        assert {out.split()[1] for out in outputs.values()} == ids
        assert ids <= {i.id for i in Sandbox.list()}
    finally:
        for sb in sandboxes:
            sb.kill()
    assert_no_leftovers(state_root)


def test_ten_sandboxes_from_asyncio(state_root: Path) -> None:
    async def main() -> list[str]:
        created = await asyncio.gather(
            *(AsyncSandbox.create() for _ in range(10)), return_exceptions=True
        )
        sandboxes = [s for s in created if isinstance(s, AsyncSandbox)]
        try:
            assert len(sandboxes) == 10, created
            results = await asyncio.gather(
                *(
                    s.commands.run(["python3", "-c", f"print({i} ** 2)"])
                    for i, s in enumerate(sandboxes)
                )
            )
            return [r.stdout for r in results]
        finally:
            await asyncio.gather(*(s.kill() for s in sandboxes))

    assert asyncio.run(main()) == [f"{i**2}\n" for i in range(10)]
    assert qemu_processes_under(state_root) == []
    assert_no_leftovers(state_root)
