"""The remote client without a server: which server and key it uses, how the server's
error bodies become our exceptions, how a command's NDJSON events become a result (over
httpx's mock transport), and that it has the local classes' whole surface."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
from typing import Any

import httpx
import pytest

from novasandbox import errors
from novasandbox.commands import AsyncCommandHandle, AsyncCommands
from novasandbox.errors import (
    AuthenticationError,
    CommandError,
    CommandTimeout,
    ConfigError,
    RemoteError,
    SandboxFileError,
    SandboxNotFound,
    ServerRequired,
    ServerUnreachable,
)
from novasandbox.files import AsyncFiles
from novasandbox.guest.protocol import ErrorCode
from novasandbox.remote import (
    ENV_API_KEY,
    ENV_SERVER,
    RemoteCommandHandle,
    RemoteCommands,
    RemoteFiles,
    RemoteSandbox,
    RemoteSandboxInfo,
    RemoteSnapshot,
    Server,
    _Http,
    error_from,
    error_of,
    resolve_server,
)
from novasandbox.sandbox import AsyncSandbox
from novasandbox.server.app import ERROR_STATUS, status_of
from novasandbox.sync import Sandbox

# --------------------------------------------------------------------------- where


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SERVER, "http://env:1")
    monkeypatch.setenv(ENV_API_KEY, "env-key")
    assert resolve_server(None, None) == Server("http://env:1", "env-key")
    assert resolve_server("https://arg:2/", "arg-key") == Server("https://arg:2", "arg-key")
    assert resolve_server("http://arg:2", None) == Server("http://arg:2", "env-key")


def test_no_server_is_local_and_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_SERVER, raising=False)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    assert resolve_server(None, None) is None
    with pytest.raises(ConfigError):
        resolve_server(None, "a-key-without-a-server")
    for url in ("127.0.0.1:8000", "ftp://h", "http://"):
        with pytest.raises(ConfigError):
            resolve_server(url, "k")
    with pytest.raises(AuthenticationError):
        resolve_server("http://h:1", None)
    assert "k3y" not in repr(resolve_server("http://h:1", "k3y"))


# --------------------------------------------------------------------------- errors


def test_every_code_comes_back_as_its_class() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls.code == errors.SandboxNotRunning.code and cls is not errors.SandboxNotRunning:
            continue  # the server's ShuttingDown shares it; the public class is the parent
        error = error_of(cls.code, "msg", path="/p")
        expected = CommandError if cls in (errors.CommandTimeout, errors.CommandFailed) else cls
        assert type(error) is expected, name
        assert error.code == cls.code or expected is CommandError
        assert error.remote_code == cls.code


def test_unknown_codes_get_the_closest_class() -> None:
    error = error_of("file-weird", "odd", path="/x")
    assert type(error) is SandboxFileError and error.path == "/x"
    assert error.remote_code == "file-weird" and "[file-weird]" in error.message
    assert type(error_of("sandbox-weird", "odd")) is errors.SandboxError
    assert type(error_of("internal-error", "boom", 500)) is RemoteError
    assert type(error_of("not-found", "no route", 404)) is RemoteError
    assert type(error_of("whatever", "no", 401)) is AuthenticationError


def test_the_agents_code_survives_the_trip() -> None:
    local = errors.from_agent(ErrorCode.IS_A_DIRECTORY, "is a directory", "/etc")
    remote = error_of(local.code, local.message, path="/etc")
    assert (type(remote), remote.agent_code) == (type(local), ErrorCode.IS_A_DIRECTORY)
    assert error_of("file-not-found", "gone").agent_code is ErrorCode.FILE_NOT_FOUND
    assert error_of("invalid-config", "bad").agent_code is None


def test_error_bodies_that_are_not_ours() -> None:
    assert type(error_from(502, b"<html>bad gateway</html>")) is RemoteError
    assert type(error_from(401, b"")) is AuthenticationError
    body = json.dumps({"error": {"code": "sandbox-not-found", "message": "no"}}).encode()
    assert type(error_from(404, body)) is SandboxNotFound


def test_the_server_answers_a_pid_nobody_runs_with_404() -> None:
    assert status_of(errors.ProcessNotFound("no")) == 404
    assert errors.ProcessNotFound in ERROR_STATUS


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    ("remote", "local"),
    [
        (RemoteSandbox, AsyncSandbox),
        (RemoteCommands, AsyncCommands),
        (RemoteFiles, AsyncFiles),
        (RemoteCommandHandle, AsyncCommandHandle),
    ],
    ids=lambda c: c.__name__,
)
def test_the_remote_classes_have_the_local_surface(remote: type, local: type) -> None:
    # AsyncSandbox's own, dispatching; and prestart, this process's own VMMs
    skip = {"create", "adopt", "connect", "list", "list_snapshots", "delete_snapshot", "prestart"}
    for name in dir(local):
        if name.startswith("_") or name in skip:
            continue
        assert hasattr(remote, name), name
        local_attr = inspect.getattr_static(local, name)
        if callable(local_attr) and not isinstance(local_attr, property):
            got = inspect.signature(getattr(remote, name)).parameters
            want = inspect.signature(getattr(local, name)).parameters
            assert list(got) == list(want), name
            assert inspect.iscoroutinefunction(getattr(remote, name)) == (
                inspect.iscoroutinefunction(getattr(local, name))
            ), name


# --------------------------------------------------------------------------- commands

INFO = {
    "id": "sb-0123456789",
    "template": "python",
    "state": "running",
    "expired": False,
    "crash_reason": None,
    "labels": {},
    "created_at": 1.0,
    "expires_at": None,
    "vcpus": 1,
    "memory_mib": 512,
    "network": "none",
    "ports": {},
    "restored": True,
    "provider": "qemu",
}


async def _pieces(body: bytes) -> Any:
    """The body in small pieces, cut anywhere (inside lines and characters too)."""
    for i in range(0, len(body), 5):
        yield body[i : i + 5]


def _sandbox(events: list[dict[str, Any]], status: int = 200) -> RemoteSandbox:
    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        assert request.url.path == "/v1/sandboxes/sb-0123456789/commands"
        sent = json.loads(request.content)
        assert sent["cmd"] == ["/bin/bash", "-l", "-c", "x"] and sent["background"] is False
        return httpx.Response(status, content=_pieces(body))

    http = _Http(Server("http://test", "k"))
    http._client = httpx.AsyncClient(
        base_url="http://test",
        headers={"Authorization": "Bearer k"},
        transport=httpx.MockTransport(answer),
    )
    return RemoteSandbox(http, RemoteSandboxInfo.from_json(INFO))


def test_events_become_callbacks_and_a_result() -> None:
    events = [
        {"type": "started", "pid": 7},
        {"type": "stdout", "data": "héllo "},
        {"type": "stderr", "data": "err"},
        {"type": "stdout", "data": "world"},
        {"type": "exit", "exit_code": 3, "signal": None, "timed_out": False, "duration": 0.5},
    ]
    out: list[str] = []

    async def main() -> None:
        sb = _sandbox(events)
        handle = await sb.commands.start("x", on_stdout=out.append, max_output=8)
        assert handle.pid == 7
        result = await handle.wait()
        assert (result.exit_code, result.stdout, result.stderr) == (3, "héllo w", "err")
        assert result.stdout_dropped == len("héllo world".encode()) - 8
        assert result.argv == ("/bin/bash", "-l", "-c", "x") and result.duration == 0.5

    asyncio.run(main())
    assert out == ["héllo ", "world"]


def test_a_timed_out_command_raises_with_its_result() -> None:
    events = [
        {"type": "started", "pid": 7},
        {"type": "stdout", "data": "up\n"},
        {"type": "exit", "exit_code": 137, "signal": 9, "timed_out": True, "duration": 1.5},
    ]
    with pytest.raises(CommandTimeout) as info:
        asyncio.run(_sandbox(events).commands.run("x", timeout=1.5))
    assert info.value.result.stdout == "up\n" and info.value.result.signal == 9


def test_an_error_event_or_a_cut_stream_raises() -> None:
    gone = {"type": "error", "error": {"code": "sandbox-expired", "message": "over"}}
    sb = _sandbox([{"type": "started", "pid": 7}, gone])
    with pytest.raises(errors.SandboxExpired):
        asyncio.run(sb.commands.run("x"))
    assert sb.expired and sb.state.value == "killed"
    with pytest.raises(ServerUnreachable):
        asyncio.run(_sandbox([{"type": "started", "pid": 7}]).commands.run("x"))


def test_an_error_response_before_the_start_raises_from_start() -> None:
    body = {"error": {"code": "invalid-cwd", "message": "no such directory"}}
    sb = _sandbox([body], status=422)
    with pytest.raises(errors.InvalidWorkingDirectory):
        asyncio.run(sb.commands.start("x"))


def test_a_server_nobody_listens_on_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerUnreachable) as info:
        asyncio.run(AsyncSandbox.list(server=f"http://127.0.0.1:{port}", api_key="k"))
    assert info.value.code == "server-unreachable"


def _offline_sandbox() -> RemoteSandbox:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    http = _Http(Server("http://test", "k"))
    http._client = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(refuse))
    return RemoteSandbox(http, RemoteSandboxInfo.from_json(INFO))


def test_a_kill_that_did_not_reach_the_server_can_be_retried() -> None:
    sb = _offline_sandbox()
    with pytest.raises(ServerUnreachable):
        asyncio.run(sb.kill())
    assert sb.state.value == "running"  # not killed: kill again later


def test_a_closed_or_killed_client_says_so_without_a_request() -> None:
    async def main() -> None:
        sb = _offline_sandbox()
        await sb.close()
        with pytest.raises(RemoteError, match="closed"):
            await sb.files.exists("/tmp")
        sb._killed = True
        with pytest.raises(errors.SandboxNotRunning):
            await sb.commands.run("true")

    asyncio.run(main())


# --------------------------------------------------------------------------- snapshots, URLs

SNAP = {
    "id": "snap-0123456789",
    "template": "python",
    "created_at": 2.0,
    "source_sandbox": "sb-0123456789",
    "vcpus": 1,
    "memory_mib": 512,
    "network": "none",
    "size_bytes": 1234,
}


def _answering(seen: list[httpx.Request]) -> RemoteSandbox:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path.removeprefix("/v1/sandboxes/sb-0123456789")
        if path == "/snapshot":
            return httpx.Response(201, json=SNAP)
        if path == "/fork":
            n = json.loads(request.content)["n"]
            kids = [{**INFO, "id": f"sb-child{i}"} for i in range(n)]
            return httpx.Response(201, json={"sandboxes": kids})
        if path.startswith("/files/") and path.endswith("-url"):
            q = request.url.params
            return httpx.Response(
                200,
                json={
                    "url": f"http://test/v1/signed/x?path={q['path']}&e={q['expires']}",
                    "method": "PUT" if "upload" in path else "GET",
                    "path": q["path"],
                    "expires_at": 9,
                },
            )
        return httpx.Response(404, json={"error": {"code": "sandbox-not-found", "message": "?"}})

    http = _Http(Server("http://test", "k"))
    http._client = httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(answer))
    return RemoteSandbox(http, RemoteSandboxInfo.from_json(INFO))


def test_snapshot_fork_and_signed_urls_go_to_their_routes() -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        sb = _answering(seen)
        snap = await sb.snapshot()
        assert snap == RemoteSnapshot(**SNAP, server="http://test")  # type: ignore[arg-type]
        assert snap.kind == "user"
        kids = await sb.fork(2)
        assert [k.id for k in kids] == ["sb-child0", "sb-child1"]
        assert all(isinstance(k, RemoteSandbox) and k.server == "http://test" for k in kids)
        up = await sb.upload_url("data.csv", expires=60)
        assert up == "http://test/v1/signed/x?path=data.csv&e=60"
        assert (await sb.download_url("/tmp/out")).endswith("path=/tmp/out&e=300")
        for bad in (0, -1, 1.5, True, "60"):
            with pytest.raises(ConfigError):
                await sb.upload_url("x", expires=bad)  # type: ignore[arg-type]
        for n in (0, 65, 1.0):
            with pytest.raises(ConfigError):
                await sb.fork(n)  # type: ignore[arg-type]

    asyncio.run(main())
    assert [(r.method, r.url.path.rsplit("/", 1)[-1]) for r in seen] == [
        ("POST", "snapshot"),
        ("POST", "fork"),
        ("POST", "upload-url"),
        ("POST", "download-url"),
    ]  # the refused arguments sent nothing


def test_snapshots_of_one_place_are_refused_in_another(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("NOVASANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv(ENV_SERVER, raising=False)
    monkeypatch.delenv(ENV_API_KEY, raising=False)
    there = RemoteSnapshot(**SNAP, server="http://elsewhere:1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kept by the server http://elsewhere:1"):
        Sandbox.create(from_snapshot=there)  # local: no server to restore it from
    with pytest.raises(ConfigError, match=r"not http://127\.0\.0\.1:9"):
        Sandbox.create(from_snapshot=there, server="http://127.0.0.1:9", api_key="k")
    with pytest.raises(ConfigError, match="kept by the server"):
        Sandbox.delete_snapshot(there)
    with pytest.raises(errors.SnapshotNotFound):
        Sandbox.create(from_snapshot="snap-nothere")  # a local id: looked up here
    assert Sandbox.list_snapshots() == []
    assert not (tmp_path / "state" / "sandboxes").exists()


def test_a_local_sandbox_has_no_signed_urls() -> None:
    local = object.__new__(AsyncSandbox)
    for method in (AsyncSandbox.upload_url, AsyncSandbox.download_url):
        with pytest.raises(ServerRequired) as info:
            asyncio.run(method(local, "/x"))
        assert info.value.code == "server-required"
        assert isinstance(info.value, ConfigError)
