"""The remote client against a real ``novasandbox serve`` with the in-process provider (the
real guest agent on this host, no VM): fast checks of the client and of the server's
command routes by pid. Commands run on this host (harmless ones), files live in this
test's temporary directory. The same behaviour on real VMs, local and remote, is in
tests/integration (test_commands.py, test_files.py, test_remote.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from novasandbox import (
    AsyncSandbox,
    AuthenticationError,
    CommandTimeout,
    ConfigError,
    InvalidWorkingDirectory,
    Sandbox,
    SandboxFileNotFound,
    SandboxNotRunning,
    SandboxState,
)
from novasandbox.procfs import pids_matching
from tests.server_support import Server, error_of, iter_wait, make_key

from .test_server import server_env


class Remote:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.files = root / "files"
        self.files.mkdir()
        self.key = make_key(self.state, "client")
        self.server = Server(self.state, env=server_env())
        self.url = self.server.url

    def create(self, **kwargs: object) -> Sandbox:
        return Sandbox.create(server=self.url, api_key=self.key, timeout=120, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    r = Remote(tmp_path_factory.mktemp("remote"))
    try:
        yield r
        assert Sandbox.list(server=r.url, api_key=r.key) == [], "a test left a sandbox"
    finally:
        r.server.close()


def test_commands_stream_to_callbacks_and_take_stdin_signals_and_kill(remote: Remote) -> None:
    with remote.create(env={"FROM": "sb"}) as sb:
        assert sb.server == remote.url and sb.state is SandboxState.RUNNING
        out: list[str] = []
        r = sb.commands.run(
            "echo $FROM$X; echo err >&2; exit 3", env={"X": "!"}, on_stdout=out.append
        )
        assert (r.exit_code, r.stdout, r.stderr, "".join(out)) == (3, "sb!\n", "err\n", "sb!\n")
        assert sb.commands.run("tr a-z A-Z", stdin=b"bytes\x00in").stdout == "BYTES\x00IN"
        with pytest.raises(CommandTimeout) as info:
            sb.commands.run("echo before; sleep 30", timeout=0.5)
        assert info.value.result.stdout == "before\n"
        with pytest.raises(InvalidWorkingDirectory):
            sb.commands.run("true", cwd=str(remote.files / "nowhere"))

        h = sb.commands.start(["cat"], open_stdin=True)
        h.send_stdin("one ")
        h.send_stdin(b"two")
        h.close_stdin()
        assert h.wait().stdout == "one two"

        ready = threading.Event()
        h = sb.commands.start(
            "trap 'echo usr1; exit 42' USR1; echo ready; sleep 60 & wait",
            on_stdout=lambda t: ready.set() if "ready" in t else None,
        )
        assert ready.wait(30)
        h.send_signal(signal.SIGUSR1)
        assert h.wait().exit_code == 42

        h = sb.commands.start("sleep 60")
        assert h.pid > 1 and not h.done()
        h.kill()
        assert h.wait().signal == signal.SIGKILL
        h.kill()  # ended: nothing to do, no error
        with remote.server.client(remote.key) as c:
            r2 = c.post(f"/v1/sandboxes/{sb.id}/commands/{h.pid}/signal", json={"signal": 15})
            assert r2.status_code == 404 and error_of(r2)["code"] == "process-not-found"
    assert sb.state is SandboxState.KILLED
    with pytest.raises(SandboxNotRunning):
        sb.commands.run("true")


def test_files_move_as_raw_bytes(remote: Remote) -> None:
    d = remote.files / "tree"
    blob = os.urandom(3 * 1024 * 1024 + 5)
    with remote.create() as sb:
        assert sb.files.write(str(d / "a" / "blob"), blob) == len(blob)
        assert (d / "a" / "blob").read_bytes() == blob
        assert sb.files.read(str(d / "a" / "blob"), format="bytes") == blob
        sb.files.write(str(d / "t.txt"), "héllo", mode=0o600)
        assert sb.files.read(str(d / "t.txt")) == "héllo"
        assert sb.files.stat(str(d / "t.txt")).mode & 0o777 == 0o600
        sb.files.make_dir(str(d / "sub"))
        assert {e.name for e in sb.files.list(str(d))} == {"a", "t.txt", "sub"}
        assert sb.files.exists(str(d / "sub")) and not sb.files.exists(str(d / "zz"))
        with pytest.raises(SandboxFileNotFound) as info:
            sb.files.read(str(d / "missing"))
        assert info.value.path == str(d / "missing")
        sb.files.remove(str(d))
        assert not d.exists()


def test_a_dropped_client_kills_its_commands_but_not_background_ones(
    remote: Remote, tmp_path: Path
) -> None:
    fg, bg = f"fg-{os.getpid()}-{tmp_path.name}", f"bg-{os.getpid()}-{tmp_path.name}"
    with remote.create() as sb:
        script = textwrap.dedent(
            f"""
            import time
            from novasandbox import Sandbox
            sb = Sandbox.connect({sb.id!r})
            a = sb.commands.start("sleep 300; : {fg}", timeout=None)
            b = sb.commands.start("sleep 301; : {bg}", timeout=None, background=True)
            print(a.pid, b.pid, flush=True)
            time.sleep(600)
            """
        )
        env = {**os.environ, "NOVASANDBOX_SERVER": remote.url, "NOVASANDBOX_API_KEY": remote.key}
        child = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line, "the client did not start its commands"
            fg_pid, bg_pid = (int(p) for p in line.split())
        finally:
            child.kill()
            child.wait()
        for _ in iter_wait("the dropped client's command to be killed"):
            if not pids_matching(fg.encode()):
                break
        assert pids_matching(bg.encode()), "the background command did not outlive its client"
        with remote.server.client(remote.key) as c:
            base = f"/v1/sandboxes/{sb.id}/commands"
            assert c.delete(f"{base}/{bg_pid}").status_code == 204
            for _ in iter_wait("the background command to be killed"):
                if not pids_matching(bg.encode()):
                    break
            for pid in (fg_pid, bg_pid):
                r = c.post(f"{base}/{pid}/close-stdin")
                assert r.status_code == 404 and error_of(r)["code"] == "process-not-found"


def test_a_wrong_key_an_unknown_pid_and_a_bad_signal(remote: Remote) -> None:
    with pytest.raises(AuthenticationError):
        Sandbox.list(server=remote.url, api_key=remote.key + "x")
    with remote.create() as sb, remote.server.client(remote.key) as c:
        base = f"/v1/sandboxes/{sb.id}/commands"
        for r in (
            c.post(f"{base}/999999/stdin", content=b"x"),
            c.post(f"{base}/999999/signal", json={"signal": 15}),
            c.delete(f"{base}/999999"),
        ):
            assert r.status_code == 404 and error_of(r)["code"] == "process-not-found"
        for bad in ({"signal": 0}, {"signal": 65}, {"signal": "TERM"}, {}):
            r = c.post(f"{base}/1/signal", json=bad)
            assert r.status_code == 422 and error_of(r)["code"] == "invalid-config", bad


def test_signed_urls_move_one_file_without_the_key(remote: Remote) -> None:
    target = remote.files / "signed.bin"
    blob = os.urandom(70_000)
    with remote.create() as sb:
        up = sb.upload_url(str(target), expires=60)
        assert "/v1/signed/" in up and remote.key not in up
        assert httpx.put(up, content=blob, timeout=30).status_code == 200  # no key
        assert target.read_bytes() == blob
        down = sb.download_url(str(target))
        got = httpx.get(down, timeout=30)
        assert got.status_code == 200 and got.content == blob
        # each URL is for its own method and path
        assert httpx.get(up, timeout=30).status_code == 403
        assert httpx.put(down, content=b"x", timeout=30).status_code == 403
        assert target.read_bytes() == blob
        for bad in (0, 3601):
            with pytest.raises(ConfigError):
                sb.upload_url(str(target), expires=bad)

        async def through_async() -> str:
            inner = await AsyncSandbox.connect(sb.id, server=remote.url, api_key=remote.key)
            try:
                return await inner.download_url(str(target), expires=30)
            finally:
                await inner.close()

        assert httpx.get(asyncio.run(through_async()), timeout=30).content == blob
    # a killed sandbox's URL no longer works
    assert httpx.get(down, timeout=30).status_code in (404, 409)
