"""The remote client against a real ``novasandbox serve`` (one per module): what only a
client of a server does (reattach from another process, labels, keys, an unreachable
server, commands that outlive or die with their client) and errors that must be the same
as a local sandbox's. The behaviour tests of commands and files run in both modes in
test_commands.py and test_files.py."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from novasandbox import (
    AsyncSandbox,
    AuthenticationError,
    ConfigError,
    NovaSandboxError,
    RemoteSandbox,
    RemoteSnapshot,
    Sandbox,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxState,
    ServerUnreachable,
    SnapshotNotFound,
)
from tests.server_support import error_of, iter_wait

from .conftest import SandboxFactory
from .served import RemoteServer
from .test_commands import guest_processes_matching

pytestmark = pytest.mark.integration


def child_env(server: RemoteServer) -> dict[str, str]:
    env = dict(os.environ)
    env["NOVASANDBOX_SERVER"] = server.url
    env["NOVASANDBOX_API_KEY"] = server.key
    return env


def test_connect_from_another_process_and_list_by_labels(remote_server: RemoteServer) -> None:
    tag = uuid.uuid4().hex[:8]
    sb = remote_server.create(labels={"suite": "remote", "run": tag})
    assert sb.state is SandboxState.RUNNING and sb.is_running()
    sb.files.write("/tmp/marker", f"hello {tag}\n")
    # another process, told where by the environment alone, reattaches by id
    script = textwrap.dedent(
        f"""
        from novasandbox import Sandbox
        sb = Sandbox.connect({sb.id!r})
        print(sb.commands.run("cat /tmp/marker").stdout, end="")
        sb.files.write("/tmp/from-child", "child was here")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=child_env(remote_server),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"hello {tag}\n"
    # the sandbox outlived that client
    assert sb.files.read("/tmp/from-child") == "child was here"
    assert sb.labels == {"suite": "remote", "run": tag}
    # another client pauses it: this one learns it when it asks
    with remote_server.server.client(remote_server.key) as c:
        assert c.post(f"/v1/sandboxes/{sb.id}/pause").status_code == 200
    assert sb.state is SandboxState.RUNNING  # as last seen
    sb.refresh()
    assert sb.state is SandboxState.PAUSED
    sb.resume()
    assert sb.state is SandboxState.RUNNING

    kw: dict[str, Any] = {"server": remote_server.url, "api_key": remote_server.key}
    listed = Sandbox.list(labels={"run": tag}, **kw)
    assert [(i.id, i.state, i.labels) for i in listed] == [
        (sb.id, "running", {"suite": "remote", "run": tag})
    ]
    assert Sandbox.list(labels={"run": "not-" + tag}, **kw) == []
    assert sb.id in {i.id for i in Sandbox.list(**kw)}
    # another key sees nothing of it
    other = {"server": remote_server.url, "api_key": remote_server.other_key}
    assert Sandbox.list(**other) == []
    with pytest.raises(SandboxNotFound):
        Sandbox.connect(sb.id, **other)
    # without a server: this host's sandboxes, which keep no labels
    assert sb.id not in {i.id for i in Sandbox.list()}
    with pytest.raises(ConfigError):
        Sandbox.list(labels={"run": tag})


def _codes(action: Callable[[], object]) -> tuple[type[BaseException], str, object]:
    with pytest.raises(NovaSandboxError) as info:
        action()
    return type(info.value), info.value.code, info.value.agent_code


def test_errors_are_the_same_local_and_remote(
    factory: SandboxFactory, remote_server: RemoteServer
) -> None:
    local = factory.create()
    remote = remote_server.create()
    actions: dict[str, Callable[[Sandbox], object]] = {
        "missing file": lambda sb: sb.files.read("/no/such/file"),
        "missing dir": lambda sb: sb.files.list("/no/such/dir"),
        "a directory read": lambda sb: sb.files.read("/etc"),
        "bad cwd": lambda sb: sb.commands.run("pwd", cwd="/does/not/exist"),
        "no such program": lambda sb: sb.commands.run(["definitely-not-a-command"]),
        "bad path": lambda sb: sb.files.read("../etc/passwd"),
        "bad timeout": lambda sb: sb.commands.run("true", timeout=-1),
        "resume a running one": lambda sb: sb.resume(),
        "a mode out of range": lambda sb: sb.files.write("/tmp/m", "x", mode=0o17777),
        "over max_size": lambda sb: sb.files.read("/etc/passwd", max_size=10),
        "not a regular file": lambda sb: sb.files.read("/dev/null"),
        "a port not forwarded": lambda sb: sb.get_host(80),
        "an empty command": lambda sb: sb.commands.run(""),
    }
    for what, action in actions.items():
        here = _codes(lambda a=action: a(local))  # type: ignore[misc]
        there = _codes(lambda a=action: a(remote))  # type: ignore[misc]
        assert here == there, what
    assert not local.files.exists("/tmp/m") and not remote.files.exists("/tmp/m")
    for sb in (local, remote):  # a command that ended: what is sent to it goes nowhere
        handle = sb.commands.start("true")
        assert handle.wait().exit_code == 0
        handle.send_stdin("late")
        handle.close_stdin()
        handle.send_signal(15)
        handle.kill()
    for sb in (local, remote):
        sb.kill()
        assert sb.state is SandboxState.KILLED
        sb.kill()  # twice: fine
    for action in (
        lambda sb: sb.commands.run("true"),
        lambda sb: sb.files.write("/tmp/x", "x"),
        lambda sb: sb.set_timeout(60),
    ):
        assert _codes(lambda a=action: a(local)) == _codes(lambda a=action: a(remote))  # type: ignore[misc]
        assert _codes(lambda a=action: a(remote))[0] is SandboxNotRunning  # type: ignore[misc]
    # the server forgot it: reattaching says so
    with pytest.raises(SandboxNotFound):
        Sandbox.connect(remote.id, server=remote_server.url, api_key=remote_server.key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_keys_and_an_unreachable_server_are_typed_errors(
    remote_server: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = remote_server.ids.all()
    url = remote_server.url
    for call in (
        lambda: Sandbox.create(server=url, api_key="nsk_wrong"),
        lambda: Sandbox.connect("sb-0000000000", server=url, api_key="nsk_wrong"),
        lambda: Sandbox.list(server=url, api_key="nsk_wrong"),
    ):
        with pytest.raises(AuthenticationError) as info:
            call()
        assert info.value.code == "unauthorized"
    monkeypatch.delenv("NOVASANDBOX_API_KEY", raising=False)
    monkeypatch.setenv("NOVASANDBOX_SERVER", url)
    with pytest.raises(AuthenticationError):  # a server but no key anywhere
        Sandbox.create()
    monkeypatch.delenv("NOVASANDBOX_SERVER")
    with pytest.raises(ConfigError):
        Sandbox.create(server="ftp://example.invalid", api_key="k")
    with pytest.raises(ConfigError):  # connect is for servers; local ones are adopted
        Sandbox.connect("sb-0000000000")
    with pytest.raises(ConfigError):  # this host's arguments do not go to a server
        Sandbox.create(server=url, api_key=remote_server.key, adoptable=True)
    with pytest.raises(SandboxNotFound):
        Sandbox.connect("sb-0000000000", server=url, api_key=remote_server.key)
    down = f"http://127.0.0.1:{_free_port()}"
    for call in (
        lambda: Sandbox.create(server=down, api_key="k"),
        lambda: Sandbox.list(server=down, api_key="k"),
    ):
        with pytest.raises(ServerUnreachable) as unreachable:
            call()
        assert unreachable.value.code == "server-unreachable"
        assert isinstance(unreachable.value, ConnectionError)
    assert remote_server.ids.all() == made  # nothing was created


def test_the_async_client(remote_server: RemoteServer) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create(
            server=remote_server.url, api_key=remote_server.key, labels={"kind": "async"}
        )
        assert isinstance(sb, RemoteSandbox)
        async with sb:
            seen: list[str] = []

            async def on_stdout(text: str) -> None:
                seen.append(text)

            r = await sb.commands.run("echo a; sleep 0.2; echo b", on_stdout=on_stdout)
            assert (r.stdout, r.exit_code, "".join(seen)) == ("a\nb\n", 0, "a\nb\n")
            h = await sb.commands.start(["cat"], open_stdin=True)
            assert h.pid > 1 and not h.done()
            await h.send_stdin(b"\x00\x01bytes")
            await h.close_stdin()
            assert (await h.wait()).stdout == "\x00\x01bytes"
            assert await sb.files.write("/tmp/b.bin", bytes(range(256))) == 256
            assert await sb.files.read("/tmp/b.bin", format="bytes") == bytes(range(256))
            await sb.pause()
            assert sb.state is SandboxState.PAUSED
            await sb.resume()
            assert sb.state is SandboxState.RUNNING
            await sb.set_timeout(None)
            assert sb.deadline is None
            await sb.set_timeout(600)
            assert sb.deadline is not None
            again = await AsyncSandbox.connect(
                sb.id, server=remote_server.url, api_key=remote_server.key
            )
            assert again.labels == {"kind": "async"}
            assert (await again.commands.run("cat /tmp/b.bin | wc -c")).stdout.strip() == "256"
            await again.close()
        assert sb.state is SandboxState.KILLED
        with pytest.raises(SandboxNotRunning):
            await sb.commands.run("true")

    asyncio.run(main())


def test_a_dropped_client_kills_its_commands_but_not_background_ones(
    remote_server: RemoteServer,
) -> None:
    sb = remote_server.create()
    fg, bg = (f"mark-{uuid.uuid4().hex[:8]}" for _ in range(2))
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
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        env=child_env(remote_server),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        fg_pid, bg_pid = (int(p) for p in child.stdout.readline().split())
        assert guest_processes_matching(sb, fg) and guest_processes_matching(sb, bg)
    finally:
        child.kill()  # SIGKILL: its connections just drop
        child.wait()
    for _ in iter_wait("the dropped client's command to be killed"):
        if not guest_processes_matching(sb, fg):
            break
    assert guest_processes_matching(sb, bg)  # the background one runs on
    # another client lists it and attaches to it (its starter is gone)
    listed = {p.pid: p for p in sb.commands.list()}
    assert listed[bg_pid].cmd[-1] == f"sleep 301; : {bg}" and fg_pid not in listed
    attached = sb.commands.connect(bg_pid)
    assert attached.argv == listed[bg_pid].cmd
    # another key cannot reach it, not even by pid
    with remote_server.server.client(remote_server.other_key) as c:
        r = c.post(f"/v1/sandboxes/{sb.id}/commands/{bg_pid}/signal", json={"signal": 9})
        assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found"
    # ... and is reached by pid from anywhere; an ended or unknown pid is a 404
    with remote_server.server.client(remote_server.key) as c:
        base = f"/v1/sandboxes/{sb.id}/commands"
        r = c.post(f"{base}/{bg_pid}/signal", json={"signal": 9})
        assert r.status_code == 204, r.text
        assert attached.wait().signal == 9  # the attached client saw it end
        for _ in iter_wait("the background command to end"):
            if not guest_processes_matching(sb, bg):
                break
        for r in (
            c.delete(f"{base}/{bg_pid}"),
            c.delete(f"{base}/{fg_pid}"),
            c.post(f"{base}/424242/stdin", content=b"x"),
            c.post(f"{base}/424242/close-stdin"),
            c.post(f"{base}/424242/signal", json={"signal": 15}),
        ):
            assert r.status_code == 404 and error_of(r)["code"] == "process-not-found", r.text
        r = c.post(f"{base}/1/signal", json={"signal": 0})
        assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"


def test_snapshots_forks_and_signed_urls_through_the_client(remote_server: RemoteServer) -> None:
    kw: dict[str, Any] = {"server": remote_server.url, "api_key": remote_server.key}
    other: dict[str, Any] = {"server": remote_server.url, "api_key": remote_server.other_key}
    sb = remote_server.create(labels={"suite": "snap"})
    sb.files.write("/home/user/state.txt", "saved")
    snap = sb.snapshot()
    assert isinstance(snap, RemoteSnapshot) and snap.id.startswith("snap-")
    assert (snap.source_sandbox, snap.template, snap.server) == (sb.id, "python", sb.server)
    assert snap.size_bytes > 0 and snap.network == "none"
    assert [s.id for s in Sandbox.list_snapshots(**kw)] == [snap.id]
    assert Sandbox.list_snapshots(**other) == []  # another key's: not even listed
    with pytest.raises(SnapshotNotFound):
        Sandbox.create(from_snapshot=snap.id, **other)
    sb.files.write("/home/user/state.txt", "later")

    restored = remote_server.create(from_snapshot=snap)
    assert restored.restored and restored.id != sb.id
    assert restored.files.read("/home/user/state.txt") == "saved"

    [child] = sb.fork(1)
    remote_server.sandboxes.append(child)
    assert child.server == sb.server and child.labels == {"suite": "snap"}
    assert child.files.read("/home/user/state.txt") == "later"
    child.files.write("/home/user/state.txt", "child")
    assert sb.files.read("/home/user/state.txt") == "later"  # independent

    # signed URLs: one file, one method, no key
    up = sb.upload_url("/tmp/up.bin", expires=60)
    assert remote_server.key not in up
    blob = os.urandom(100_000)
    assert httpx.put(up, content=blob, timeout=60).status_code == 200
    assert sb.files.read("/tmp/up.bin", format="bytes") == blob
    got = httpx.get(sb.download_url("/tmp/up.bin"), timeout=60)
    assert got.status_code == 200 and got.content == blob
    with pytest.raises(ConfigError):
        sb.download_url("/tmp/up.bin", expires=7200)

    async def through_async() -> RemoteSnapshot:
        inner = await AsyncSandbox.connect(child.id, **kw)
        try:
            url = await inner.download_url("/home/user/state.txt")
            assert httpx.get(url, timeout=60).content == b"child"
            return await inner.snapshot()
        finally:
            await inner.close()

    second = asyncio.run(through_async())
    assert second.source_sandbox == child.id
    assert {s.id for s in Sandbox.list_snapshots(**kw)} == {snap.id, second.id}

    # deleting: the key's own only; restored sandboxes run on
    with pytest.raises(SnapshotNotFound):
        Sandbox.delete_snapshot(snap, **other)
    Sandbox.delete_snapshot(snap, **kw)
    asyncio.run(AsyncSandbox.delete_snapshot(second.id, **kw))
    assert Sandbox.list_snapshots(**kw) == []
    with pytest.raises(SnapshotNotFound):
        Sandbox.create(from_snapshot=snap, **kw)
    assert restored.commands.run("cat /home/user/state.txt").stdout == "saved"
