"""VMMs started ahead (``Sandbox.prestart``) on real QEMU: a plain create restores into
one and another is started in its place; creates it cannot serve start their own; one
that died while waiting is skipped; ``prestart(0)`` and the end of the process kill
them, leaving nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novasandbox import ConfigError, Sandbox, SandboxState
from novasandbox.gc import kill_sandbox
from novasandbox.records import list_sandboxes, sandboxes_dir
from tests.server_support import Server, iter_wait, make_key

from .conftest import SandboxFactory, assert_no_leftovers, qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers

pytestmark = pytest.mark.integration


def waiting(root: Path) -> dict[str, int]:
    """The VMMs started ahead in the state directory ``root``: id -> VMM pid."""
    return {
        i.id: i.pid
        for i in list_sandboxes(root)
        if i.state == SandboxState.STARTING and i.pid is not None and i.alive
    }


def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def spares(state_root: Path) -> Iterator[None]:
    try:
        yield
    finally:
        assert Sandbox.prestart("python", 0) == 0


def test_a_create_restores_into_a_vmm_started_ahead(
    factory: SandboxFactory, state_root: Path, spares: None
) -> None:
    assert Sandbox.prestart("python", 1) == 1
    (spare_id, spare_pid), *rest = waiting(state_root).items()
    assert rest == []
    sb = factory.create(env={"GREETING": "hi"})
    # the create took the VMM that waited: its id, its process
    assert sb.id == spare_id
    assert {i.id: i.pid for i in list_sandboxes(state_root)}[sb.id] == spare_pid
    assert sb.state is SandboxState.RUNNING and sb.restored
    assert sb.commands.run("echo $GREETING").stdout == "hi\n"
    sb.files.write("/home/user/f", "x")
    assert sb.files.read("/home/user/f") == "x"
    # another one is started in its place, in the background
    wait_for(lambda: len(waiting(state_root)) == 1, "the replacement")
    (replacement, _), *_ = waiting(state_root).items()
    assert replacement != sb.id
    # a second create from a VMM started ahead has its own identity
    other = factory.create()
    assert other.id == replacement
    probe = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    assert sb.commands.run(probe).stdout != other.commands.run(probe).stdout


def test_creates_it_cannot_serve_start_their_own_vmm(
    factory: SandboxFactory, state_root: Path, spares: None
) -> None:
    Sandbox.prestart("python", 1)
    (spare_id, _), *_ = waiting(state_root).items()
    cold = factory.create(cold=True)
    networked = factory.create(network="nat")
    assert spare_id not in (cold.id, networked.id)
    assert not cold.restored
    assert list(waiting(state_root)) == [spare_id]  # still waiting, untouched


def test_a_vmm_that_died_while_waiting_is_skipped(
    factory: SandboxFactory, state_root: Path, spares: None
) -> None:
    Sandbox.prestart("python", 1)
    (spare_id, spare_pid), *_ = waiting(state_root).items()
    os.kill(spare_pid, signal.SIGKILL)
    sb = factory.create()
    assert sb.id != spare_id
    assert sb.commands.run("echo ok").stdout == "ok\n"
    # the dead one is released (its state goes) and a live one replaces it
    wait_for(lambda: not (state_root / "sandboxes" / spare_id).exists(), "the dead one's release")
    wait_for(lambda: len(waiting(state_root)) == 1, "the replacement")


def test_prestart_zero_and_the_process_end_kill_them(state_root: Path) -> None:
    assert Sandbox.prestart("python", 2) == 2
    assert len(waiting(state_root)) == 2
    assert Sandbox.prestart("python", 0) == 0
    assert_no_leftovers(state_root)
    # a process that exits with VMMs started ahead leaves none behind
    script = textwrap.dedent(
        """
        from novasandbox import Sandbox
        assert Sandbox.prestart("python", 2) == 2
        print("ready", flush=True)
        """
    )
    env = dict(os.environ, NOVASANDBOX_STATE_DIR=str(state_root))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ready\n"
    assert qemu_processes_under(state_root) == []
    assert_no_leftovers(state_root)


@pytest.mark.parametrize("count", [-1, 65, 1.5, "2", True])
def test_bad_counts_are_refused(count: object, state_root: Path) -> None:
    with pytest.raises(ConfigError):
        Sandbox.prestart("python", count)  # type: ignore[arg-type]
    assert waiting(state_root) == {}


def test_a_provider_without_prestart_is_refused(
    state_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVASANDBOX_ALLOW_INPROCESS", "1")
    with pytest.raises(ConfigError, match="cannot start VMMs ahead"):
        Sandbox.prestart("python", 1, provider="inprocess")
    assert waiting(state_root) == {}


def test_a_server_started_with_prestart_restores_its_creates_into_them() -> None:
    """``serve --prestart python=1``: the server's creates take the VMM that waits (the
    sandbox gets its id) and another is started; a stop kills it too, leaving nothing."""
    root = Path(tempfile.mkdtemp(prefix="nsp-", dir="/tmp"))
    ids = SandboxIds(root)
    server: Server | None = None
    try:
        key = make_key(root, "alice")
        server = Server(root, "--prestart", "python=1", log=Path(f"{root}.log"))
        for _ in iter_wait("the VMM started ahead", limit=60):
            if len(waiting(root)) == 1:
                break
        (spare_id, _), *_ = waiting(root).items()
        sb = Sandbox.create("python", server=server.url, api_key=key)
        try:
            assert sb.id == spare_id
            assert sb.commands.run("echo hi").stdout == "hi\n"
        finally:
            sb.kill()
        for _ in iter_wait("the replacement", limit=60):
            if len(waiting(root)) == 1 and spare_id not in waiting(root):
                break
        # a server killed with one waiting: the next start reaps it and starts its own
        (orphan, orphan_pid), *_ = waiting(root).items()
        server.stop(signal.SIGKILL)
        server.close()
        assert waiting(root) == {orphan: orphan_pid}  # nobody killed it
        server = Server(root, "--prestart", "python=1", log=Path(f"{root}.log"))
        for _ in iter_wait("the orphan reaped and a new one waiting", limit=60):
            now = waiting(root)
            if orphan not in now and len(now) == 1:
                break
        assert not (sandboxes_dir(root) / orphan).exists()
        assert orphan_pid not in qemu_processes_under(root)  # (a zombie of nobody's, at most)
        server.close()
        server = None
        assert qemu_processes_under(root) == []
        base = sandboxes_dir(root)
        assert not base.is_dir() or list(base.iterdir()) == []
        check_no_leftovers(root, ids.all())
    finally:
        if server is not None:
            server.close()
            for info in list_sandboxes(root):
                kill_sandbox(info.id, root)
        ids.close()
        shutil.rmtree(root, ignore_errors=True)
        Path(f"{root}.log").unlink(missing_ok=True)


def test_serve_refuses_a_bad_prestart_spec(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "novasandbox.cli",
            "serve",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--prestart",
            "python",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "--prestart takes TEMPLATE=N" in out.stderr
