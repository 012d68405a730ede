"""NovaSandbox's own logic through the in-process provider: the real guest agent on the
host, no VM. Lifecycle and states, lifetime, crash, records and gc, pools, and what the
provider refuses. Fast: no kernel boots.

The provider isolates nothing; these tests run only harmless commands, in temporary
directories."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novasandbox import (
    AsyncPool,
    AsyncSandbox,
    ConfigError,
    Sandbox,
    SandboxCrashed,
    SandboxExpired,
    SandboxNotRunning,
    SandboxState,
    SnapshotError,
)
from novasandbox.gc import kill_sandbox, reap
from novasandbox.records import list_sandboxes, sandboxes_dir
from novasandbox.vm import get_provider, provider_name
from novasandbox.vm.inprocess import process_tree

ENABLE = "NOVASANDBOX_ALLOW_INPROCESS"


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private state directory, the provider enabled, and nothing left at the end."""
    root = tmp_path / "state"
    monkeypatch.setenv("NOVASANDBOX_STATE_DIR", str(root))
    monkeypatch.setenv(ENABLE, "1")
    monkeypatch.delenv("NOVASANDBOX_PROVIDER", raising=False)
    yield root
    left = [i for i in list_sandboxes(root) if i.alive]
    for info in left:
        kill_sandbox(info.id, root)
    assert left == [], "a test left a sandbox running"


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def entries(root: Path) -> list[str]:
    base = sandboxes_dir(root)
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


# --------------------------------------------------------------------- choosing it


def test_it_is_refused_unless_enabled(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    monkeypatch.delenv(ENABLE)
    with pytest.raises(ConfigError) as info:
        Sandbox.create(provider="inprocess")
    assert info.value.code == "invalid-config"
    assert "isolation" in info.value.message
    monkeypatch.setenv("NOVASANDBOX_PROVIDER", "inprocess")
    with pytest.raises(ConfigError):
        Sandbox.create()  # by the environment: refused the same way
    monkeypatch.setenv(ENABLE, "yes")  # only "1" enables it
    with pytest.raises(ConfigError):
        provider_name("inprocess")
    assert entries(state) == []


def test_providers_are_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert provider_name(None, {}) == "qemu"  # the default
    assert provider_name(None, {"NOVASANDBOX_PROVIDER": "qemu"}) == "qemu"
    for bad in ("firecracker", "QEMU", "", 3):
        with pytest.raises(ConfigError):
            provider_name(bad, {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        provider_name(None, {"NOVASANDBOX_PROVIDER": "nope"})
    assert get_provider("inprocess") is get_provider("inprocess")  # made once
    assert not get_provider("inprocess").capabilities.isolated
    assert get_provider("qemu").capabilities.isolated


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "novasandbox.cli", "doctor", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


def test_doctor_says_which_provider_runs_sandboxes() -> None:
    report = json.loads(doctor({"NOVASANDBOX_PROVIDER": "inprocess"}, "--json").stdout)
    assert report["provider"]["name"] == "inprocess"
    assert report["provider"]["isolated"] is False
    assert set(report["provider"]["available"]) == {"qemu", "inprocess"}
    text = doctor({"NOVASANDBOX_PROVIDER": "inprocess"}).stdout
    assert "provider:     inprocess (NOT ISOLATED" in text
    bad = json.loads(doctor({"NOVASANDBOX_PROVIDER": "bogus"}, "--json").stdout)
    assert bad["provider"]["name"] == "invalid" and "bogus" in bad["provider"]["reason"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"network": "nat"},
        {"network": "tap"},
        {"drives": ["x"]},
    ],
)
def test_what_it_cannot_do_is_refused_before_anything_starts(
    kwargs: dict[str, object], state: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        Sandbox.create(provider="inprocess", **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "invalid-config"
    assert entries(state) == []


# --------------------------------------------------------------------- lifecycle


def test_lifecycle(state: Path, tmp_path: Path) -> None:
    with Sandbox.create(provider="inprocess", env={"GREETING": "hi"}) as sb:
        assert sb.state is SandboxState.RUNNING and sb.is_running()
        assert not sb.restored and sb.cold_reason == "the inprocess provider boots no image"
        r = sb.commands.run("echo $GREETING; exit 3", cwd=str(tmp_path))
        assert (r.stdout, r.exit_code) == ("hi\n", 3)
        target = tmp_path / "f.txt"
        sb.files.write(str(target), "text")
        assert sb.files.read(str(target)) == "text"
        [info] = [i for i in Sandbox.list() if i.id == sb.id]
        assert info.provider == "inprocess" and info.alive and info.state == "running"
        assert info.vmm_uid is None and info.network == "none"
        sb.pause()
        assert sb.state is SandboxState.PAUSED
        assert sb._inner._vm is not None
        agent = sb._inner._vm.pid
        assert _proc_state(agent) == "T"  # the whole tree is stopped
        with pytest.raises(SandboxNotRunning):
            sb.commands.run("true")
        sb.resume()
        assert sb.state is SandboxState.RUNNING
        assert sb.commands.run("echo back").stdout == "back\n"
        sid = sb.id
    assert sb.state is SandboxState.KILLED
    assert gone(agent)
    assert sid not in entries(state)
    with pytest.raises(SandboxNotRunning):
        sb.commands.run("true")
    sb.kill()  # twice is fine


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def gone(pid: int, wait: float = 5.0) -> bool:
    """Dead (within ``wait`` seconds: SIGKILL takes a moment): no such process, or a
    zombie nobody has collected yet."""
    deadline = time.monotonic() + wait
    while _proc_state(pid) not in ("gone", "Z", "X"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_kill_ends_the_whole_process_tree(tmp_path: Path) -> None:
    """What commands leave behind (a daemonized grandchild too) dies with the sandbox."""
    sb = Sandbox.create(provider="inprocess")
    pidfile = tmp_path / "pid"
    sb.commands.run(f"(setsid sleep 600 & echo $! > {pidfile}) &", cwd=str(tmp_path))
    deadline = time.monotonic() + 5
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    orphan = int(pidfile.read_text())
    assert sb._inner._vm is not None
    assert orphan in process_tree(sb._inner._vm.pid)  # re-parented to the agent
    sb.kill()
    assert gone(orphan), "the sleep outlived its sandbox"


def test_snapshots_are_refused_with_a_typed_error(state: Path) -> None:
    with Sandbox.create(provider="inprocess") as sb:
        with pytest.raises(SnapshotError) as info:
            sb.snapshot()
        assert info.value.code == "snapshot-error"
        with pytest.raises(SnapshotError):
            sb.fork()
        assert sb.is_running()  # and it goes on
        assert not (state / "snapshots").exists() or not list((state / "snapshots").iterdir())


def test_a_dead_agent_is_a_crash_with_its_reason(state: Path) -> None:
    sb = Sandbox.create(provider="inprocess")
    assert sb._inner._vm is not None
    os.kill(sb._inner._vm.pid, signal.SIGKILL)
    with pytest.raises(SandboxCrashed) as info:
        sb.commands.run("true")
    assert sb.state is SandboxState.CRASHED
    assert "signal 9" in info.value.reason
    assert [i.state for i in list_sandboxes(state) if i.id == sb.id] == ["crashed"]
    sb.kill()
    assert sb.id not in entries(state)


def test_the_lifetime_ends_it(state: Path) -> None:
    sb = Sandbox.create(provider="inprocess", timeout=0.5)
    assert sb.commands.run("echo alive").stdout == "alive\n"
    deadline = time.monotonic() + 10
    while sb.state is not SandboxState.KILLED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sb.expired
    with pytest.raises(SandboxExpired) as info:
        sb.commands.run("true")
    assert info.value.code == "sandbox-expired"
    assert sb.id not in entries(state)


def test_set_timeout_moves_the_deadline(state: Path) -> None:
    with Sandbox.create(provider="inprocess", timeout=0.5) as sb:
        sb.set_timeout(60)
        time.sleep(1.0)
        assert sb.is_running() and not sb.expired
        [info] = [i for i in list_sandboxes(state) if i.id == sb.id]
        assert info.deadline is not None and info.deadline > time.time() + 50


def test_create_failure_leaves_nothing(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent never answers (its interpreter is not Python): the error is typed and
    no process, record or directory is left."""
    import novasandbox.vm.inprocess as inprocess

    monkeypatch.setattr(inprocess.sys, "executable", "/bin/true")
    with pytest.raises(Exception) as info:
        Sandbox.create(provider="inprocess", boot_timeout=5)
    assert info.value.code == "vm-start-failed"  # type: ignore[attr-defined]
    assert entries(state) == []


# --------------------------------------------------------------------- records and gc

OWNER = """
import os, sys, time
from novasandbox import Sandbox
sb = Sandbox.create(provider="inprocess", timeout=None)
print(sb.id, sb._inner._vm.pid, flush=True)
time.sleep(600)
"""


def test_gc_reaps_the_sandbox_of_an_owner_that_died(state: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert owner.stdout is not None
        sid, pid = owner.stdout.readline().split()
        [info] = [i for i in list_sandboxes(state) if i.id == sid]
        assert info.alive and info.owner_alive and not info.orphaned
        assert reap(state) == []  # a live owner's sandbox is left alone
    finally:
        owner.kill()
        owner.wait()
    [info] = [i for i in list_sandboxes(state) if i.id == sid]
    assert not info.owner_alive and info.abandoned
    # while its process runs it is orphaned (the in-process agent may also notice its
    # owner's end first and exit: then only its record and directory are left)
    assert info.status == ("orphaned" if info.alive else "running")
    assert reap(state) == [sid]
    assert gone(int(pid))
    assert sid not in entries(state)


def test_the_next_create_releases_what_a_dead_owner_left(state: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert owner.stdout is not None
    sid, pid = owner.stdout.readline().split()
    owner.kill()
    owner.wait()
    with Sandbox.create(provider="inprocess") as sb:
        assert sid not in entries(state)
        assert gone(int(pid))
        assert sb.is_running()


def test_kill_by_id_from_another_process(state: Path) -> None:
    sb = Sandbox.create(provider="inprocess")
    assert sb._inner._vm is not None
    pid = sb._inner._vm.pid
    subprocess.run(
        [sys.executable, "-m", "novasandbox.cli", "kill", sb.id[:6]],
        check=True,
        env=os.environ,
        capture_output=True,
    )
    assert sb.id not in entries(state)
    assert sb.state is SandboxState.CRASHED  # its owner sees the VMM gone
    assert gone(pid)
    sb.kill()


# --------------------------------------------------------------------- pools


def test_a_pool_hands_out_running_sandboxes(state: Path) -> None:
    async def main() -> None:
        async with AsyncPool("python", 2, provider="inprocess") as pool:
            sb = await pool.acquire(timeout=30)
            assert isinstance(sb, AsyncSandbox) and sb.is_running()
            assert sb.provider == "inprocess"
            assert (await sb.commands.run("echo pooled")).stdout == "pooled\n"
            await sb.kill()
            deadline = time.monotonic() + 10
            while pool.ready < 2:  # refilled
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert [i for i in list_sandboxes(state) if i.alive] == []

    run(main())


def test_a_pool_refuses_the_provider_when_not_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENABLE)
    with pytest.raises(ConfigError):
        AsyncPool("python", 1, provider="inprocess")
