"""The remote client: a sandbox that a ``novasandbox serve`` process owns, used through its
HTTP API with the Python API of a local one.

``AsyncSandbox.create(..., server=URL, api_key=KEY)`` (or ``NOVASANDBOX_SERVER`` and
``NOVASANDBOX_API_KEY`` in the environment; explicit arguments win) returns a
``RemoteSandbox``; ``Sandbox`` (``sync.py``) wraps it as it wraps ``AsyncSandbox``, so this
one async implementation (on ``httpx.AsyncClient``) serves both. Same methods, same
results (``CommandResult``, ``EntryInfo``), same exceptions with the same ``code``: the
server's ``{"error": {"code", "message"}}`` becomes the class of ``errors`` with that code
(``remote_code`` keeps the server's code; one this client does not know becomes the
closest family, e.g. ``file-*`` a ``SandboxFileError``, else ``RemoteError``). A server
that cannot be reached, or a connection that breaks mid-request, is
``ServerUnreachable``; a missing or wrong key ``AuthenticationError``.

Commands stream their output as NDJSON (``server/streams.py``); callbacks are called as
the lines arrive. The server kills a command whose stream is dropped (this process exits
or loses its connection) unless it was started with ``background=True``. Stdin, signals
and kill go to ``/commands/PID/...``. Files move as raw bytes.

What a sandbox on a server does not offer its clients raises ``RemoteUnsupported``:
``paths``, ``config``, ``accel``, ``guest_kernel``, ``console_tail``, ``timings``,
``cold_reason``, ``source_snapshot``, ``network_log``. ``state``, ``expired``,
``crash_reason`` and ``deadline`` are what the server said last, refreshed by every call
of this client that returns the sandbox (``refresh()`` asks).

Snapshots stay on the server and belong to the key that made them: ``snapshot()``
returns a ``RemoteSnapshot`` (its id and description, no host paths), which
``create(from_snapshot=..., server=...)`` restores on the same server (the id alone
does too); ``fork(n)`` returns new ``RemoteSandbox``es. What only a server offers:
``upload_url(path)`` and ``download_url(path)``, signed URLs that move one file without
the API key until they expire.

This module does not import the server (no FastAPI on the client's path).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import json
import os
import re
import shlex
import signal
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, overload

from . import errors
from .code import (
    CodeInterpreter,
    CodeMethods,
)
from .commands import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_MAX_OUTPUT,
    MAX_TAG,
    OutputCallback,
    _call_back,
    _normalize_argv,
)
from .config import (
    check_guest_path,
    validate_byte_count,
    validate_env,
    validate_timeout,
    validate_user,
)
from .errors import (
    AgentProtocolError,
    AuthenticationError,
    CommandError,
    CommandFailed,
    CommandTimeout,
    ConfigError,
    FileTooLarge,
    HostToolMissing,
    NovaSandboxError,
    ProcessNotFound,
    RemoteError,
    RemoteUnsupported,
    SandboxCrashed,
    SandboxExpired,
    SandboxFileError,
    SandboxLost,
    SandboxNotRunning,
    ServerUnreachable,
    check_int,
)
from .files import (
    DEFAULT_FILE_TIMEOUT,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_READ,
    MAX_ENTRIES,
    AsyncWatchHandle,
    EntryInfo,
    FilesystemEvent,
    WatchCallback,
    WriteData,
    WriteEntry,
    check_data,
    data_chunks,
    prefetched,
    validate_mode,
    write_entries,
)
from .guest.protocol import (
    ENTRY,
    MAX_LIST_DEPTH,
    WATCH_EVENT,
    ErrorCode,
    ProtocolError,
    check_value,
)
from .results import (
    CommandResult,
    ProcessInfo,
    SandboxMetrics,
    SandboxState,
)
from .snapshots import Snapshot
from .terminal import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    LOGIN_SHELL,
    AsyncTerminalHandle,
    DataCallback,
    check_size,
)

if TYPE_CHECKING:
    import httpx  # imported where used: ~0.1 s that local sandboxes never need

ENV_SERVER = "NOVASANDBOX_SERVER"
ENV_API_KEY = "NOVASANDBOX_API_KEY"
CONNECT_TIMEOUT = 10.0
"""Seconds to open a connection to the server before ``ServerUnreachable``."""
REQUEST_TIMEOUT = 600.0
"""Seconds the server may stay silent in a request that is not a stream (a create under
load restores a snapshot or boots a kernel)."""
MAX_REPLY = 64 << 20
"""Bytes of a JSON reply (a listing) or of one NDJSON event line this client accepts."""
DEFAULT_URL_EXPIRES = 300
"""Seconds a signed URL lives by default (the server allows up to an hour)."""
STDIN_CHUNK = 1 << 20
"""Bytes of stdin sent per request (the server bounds request bodies)."""
_FAMILIES = (
    ("file-", SandboxFileError),
    ("sandbox-", errors.SandboxError),
    ("command-", errors.CommandError),
    ("agent-", errors.AgentError),
    ("snapshot-", errors.SnapshotError),
    ("template-", errors.TemplateError),
)
"""The class of a code this client does not know, by the code's first word."""


def _error_classes() -> dict[str, type[NovaSandboxError]]:
    found: dict[str, type[NovaSandboxError]] = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        found.setdefault(cls.code, cls)
    return found


ERROR_CLASSES = _error_classes()
"""Every public error class by its code."""


@dataclass(frozen=True, slots=True)
class Server:
    """Where a server is and the key to use there."""

    url: str
    api_key: str = field(repr=False)


def resolve_server(server: str | None, api_key: str | None) -> Server | None:
    """The server to use: ``server``/``api_key``, else ``NOVASANDBOX_SERVER`` and
    ``NOVASANDBOX_API_KEY``; None (no server anywhere): local sandboxes. The one place
    that decides between local and remote."""
    url = server if server is not None else os.environ.get(ENV_SERVER, "")
    if not url:
        if api_key is not None:
            raise ConfigError(f"api_key is for a server: give server= or set {ENV_SERVER}")
        return None
    if not isinstance(url, str):
        raise ConfigError(f"server must be a URL string, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"server must be an http:// or https:// URL, got {url!r}")
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY, "")
    if not isinstance(key, str) or not key:
        raise AuthenticationError(f"a server needs an API key: give api_key= or set {ENV_API_KEY}")
    return Server(url.rstrip("/"), key)


def error_from(status: int, body: bytes, path: str = "") -> NovaSandboxError:
    """The exception for an error response (``path``: the guest path of a file request)."""
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = body[:300].decode("utf-8", "replace")
        if status == 401:
            return AuthenticationError(f"the server refused the API key: {text}")
        return RemoteError(f"the server answered HTTP {status}: {text}")
    return error_of(code, message, status, path)


def error_of(code: str, message: str, status: int = 0, path: str = "") -> NovaSandboxError:
    """The exception with code ``code`` (or the closest class for a code this client does
    not know; ``remote_code`` keeps the server's)."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        cls = next((c for prefix, c in _FAMILIES if code.startswith(prefix)), None)
        if cls is None:
            cls = AuthenticationError if status == 401 else RemoteError
        message = f"{message} [{code}]"
    error = _instance(cls, message, path)
    error.remote_code = code
    error.agent_code = _agent_code(code, message)
    return error


def _agent_code(code: str, message: str) -> ErrorCode | None:
    """The guest agent's code an error stands for, as ``from_agent`` leaves it readable:
    the code itself, or ``[CODE]`` at the end of the message where the class's is wider."""
    if message.endswith("]") and "[" in message:
        with contextlib.suppress(ValueError):
            return ErrorCode(message[message.rindex("[") + 1 : -1])
    with contextlib.suppress(ValueError):
        return ErrorCode(code)
    return None


def _instance(cls: type[NovaSandboxError], message: str, path: str) -> NovaSandboxError:
    if issubclass(cls, SandboxFileError):
        return cls(message, path)
    if issubclass(cls, HostToolMissing):
        tool = HostToolMissing.__new__(HostToolMissing)
        NovaSandboxError.__init__(tool, message)
        tool.tool = tool.package = ""
        return tool
    if issubclass(cls, SandboxLost):  # the node its message names (a cluster's)
        found = re.search(r"\bnode ([0-9a-f]{8,})", message)
        return cls(message, found.group(1) if found else "")
    if cls in (CommandTimeout, CommandFailed):  # results, not errors, on the wire
        return errors.CommandError(message)
    return cls(message)


def _ended_state(error: NovaSandboxError) -> SandboxState | None:
    if isinstance(error, SandboxCrashed):
        return SandboxState.CRASHED
    if isinstance(error, SandboxLost):
        return SandboxState.LOST
    if isinstance(error, SandboxNotRunning):
        return SandboxState.KILLED
    return None


class _Http:
    """The HTTP client of one sandbox (or one call): errors mapped, bodies bounded."""

    def __init__(self, server: Server) -> None:
        import httpx

        self.server = server
        self._client = httpx.AsyncClient(
            base_url=server.url,
            headers={"Authorization": f"Bearer {server.api_key}"},
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            # every running command holds a connection (its stream): no pool limit
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
            follow_redirects=False,
        )

    def _unreachable(self, exc: httpx.TransportError) -> ServerUnreachable:
        import httpx

        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            what = "cannot reach the NovaSandbox server at"
        else:
            what = "lost the connection to the NovaSandbox server at"
        return ServerUnreachable(f"{what} {self.server.url}: {exc or type(exc).__name__}")

    async def call(
        self,
        method: str,
        url: str,
        *,
        path: str = "",
        **kwargs: Any,
    ) -> Any:
        """A request with a JSON answer (None for 204); errors raised."""
        async with self.stream(method, url, path=path, **kwargs) as response:
            body = await _read_bounded(response, MAX_REPLY)
        if response.status_code == 204 or not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise RemoteError("the server sent a reply that is not JSON") from None

    def stream(self, method: str, url: str, *, path: str = "", **kwargs: Any) -> _Streaming:
        """A request whose answer is read as it comes (``async with``); an error response
        is raised on entry."""
        return _Streaming(self, method, url, path, kwargs)

    async def aclose(self) -> None:
        await self._client.aclose()


class _Streaming:
    def __init__(
        self, http: _Http, method: str, url: str, path: str, kwargs: dict[str, Any]
    ) -> None:
        self._http = http
        self._args = (method, url)
        self._path = path
        self._kwargs = kwargs
        self._cm: Any = None

    async def __aenter__(self) -> httpx.Response:
        import httpx

        method, url = self._args
        if self._http._client.is_closed:
            raise RemoteError("this client of the sandbox was closed: connect to it again")
        self._cm = self._http._client.stream(method, url, **self._kwargs)
        try:
            response: httpx.Response = await self._cm.__aenter__()
        except httpx.TransportError as exc:
            raise self._http._unreachable(exc) from exc
        if response.status_code >= 400:
            try:
                body = await _read_bounded(response, MAX_REPLY)
            except NovaSandboxError:
                body = b""
            finally:
                await self._cm.__aexit__(None, None, None)
            raise error_from(response.status_code, body, self._path)
        return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import httpx

        try:
            await self._cm.__aexit__(exc_type, exc, tb)
        except httpx.TransportError as error:
            if exc is None:
                raise self._http._unreachable(error) from error


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    chunks = bytearray()
    async for chunk in _bytes(response):
        chunks += chunk
        if len(chunks) > limit:
            raise RemoteError(f"the server's reply is over {limit} bytes")
    return bytes(chunks)


async def _bytes(response: httpx.Response) -> AsyncIterator[bytes]:
    import httpx

    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"lost the connection to the NovaSandbox server: {exc}") from exc


async def _lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The lines of an NDJSON body, each bounded by ``MAX_REPLY``."""
    pending = bytearray()
    async for chunk in _bytes(response):
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[: end + 1]
            if line.strip():
                yield line
        if len(pending) > MAX_REPLY:
            raise RemoteError(f"an event line of the server is over {MAX_REPLY} bytes")
    if pending.strip():
        yield bytes(pending)


# --------------------------------------------------------------------------- sandboxes


@dataclass(frozen=True, slots=True)
class RemoteSandboxInfo:
    """A sandbox of a server, as ``Sandbox.list(server=...)`` returns it."""

    id: str
    template: str
    state: str
    labels: dict[str, str]
    created_at: float
    deadline: float | None
    """When its lifetime ends (epoch seconds); None: no limit."""
    expired: bool
    crash_reason: str | None
    vcpus: int
    memory_mib: int
    network: str
    ports: dict[str, str]
    restored: bool
    provider: str
    node: str | None = None
    """Through a cluster (``serve --ray``): the Ray node id it runs on."""

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RemoteSandboxInfo:
        try:
            return cls(
                id=str(d["id"]),
                template=str(d["template"]),
                state=str(d["state"]),
                labels=dict(d["labels"]),
                created_at=float(d["created_at"]),
                deadline=None if d["expires_at"] is None else float(d["expires_at"]),
                expired=bool(d["expired"]),
                crash_reason=d["crash_reason"],
                vcpus=int(d["vcpus"]),
                memory_mib=int(d["memory_mib"]),
                network=str(d["network"]),
                ports=dict(d["ports"]),
                restored=bool(d["restored"]),
                provider=str(d["provider"]),
                node=None if d.get("node") is None else str(d["node"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server described a sandbox in an unknown shape: {exc}") from exc

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "running", "paused", "broken")


@dataclass(frozen=True, slots=True)
class RemoteSnapshot:
    """A snapshot a server keeps for the key that made it (``sandbox.snapshot()`` of a
    ``RemoteSandbox``): the fields of ``Snapshot`` that say something off the server's
    host. ``create(from_snapshot=..., server=...)`` restores it on ``server``."""

    id: str
    template: str
    created_at: float
    source_sandbox: str | None
    vcpus: int
    memory_mib: int
    network: str
    """The network mode it was saved with (it restores only into a compatible one)."""
    size_bytes: int
    server: str
    """The URL of the server that keeps it."""
    kind: Literal["user"] = "user"

    @classmethod
    def from_json(cls, d: Mapping[str, Any], server: str) -> RemoteSnapshot:
        try:
            source = d["source_sandbox"]
            return cls(
                id=str(d["id"]),
                template=str(d["template"]),
                created_at=float(d["created_at"]),
                source_sandbox=None if source is None else str(source),
                vcpus=int(d["vcpus"]),
                memory_mib=int(d["memory_mib"]),
                network=str(d["network"]),
                size_bytes=int(d["size_bytes"]),
                server=server,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(
                f"the server described a snapshot in an unknown shape: {exc}"
            ) from exc


def snapshot_id_for(snapshot: Snapshot | RemoteSnapshot | str, server: Server) -> str:
    """The id of ``snapshot`` to restore or delete on ``server``: a ``RemoteSnapshot`` of
    that server or an id; ``ConfigError`` for a local snapshot or another server's."""
    if isinstance(snapshot, Snapshot):
        raise ConfigError(
            f"snapshot {snapshot.id} is a local one (this host's): a server restores only "
            "the snapshots it made (sandbox.snapshot() of one of its sandboxes)"
        )
    if isinstance(snapshot, RemoteSnapshot):
        if snapshot.server != server.url:
            raise ConfigError(
                f"snapshot {snapshot.id} is kept by the server {snapshot.server}, not {server.url}"
            )
        return snapshot.id
    if not isinstance(snapshot, str) or not snapshot or "/" in snapshot:
        raise ConfigError(f"a snapshot is a Snapshot, a RemoteSnapshot or an id, got {snapshot!r}")
    return snapshot


async def list_snapshots_on(server: Server) -> list[RemoteSnapshot]:
    """The key's snapshots on ``server`` (oldest first)."""
    http = _Http(server)
    try:
        reply = await http.call("GET", "/v1/snapshots")
    finally:
        await http.aclose()
    try:
        return [RemoteSnapshot.from_json(d, server.url) for d in reply["snapshots"]]
    except (KeyError, TypeError) as exc:
        raise RemoteError("the server sent a list in an unknown shape") from exc


async def delete_snapshot_on(server: Server, snapshot: Snapshot | RemoteSnapshot | str) -> None:
    """Delete the key's snapshot on ``server`` (sandboxes restored from it run on)."""
    snapshot_id = snapshot_id_for(snapshot, server)
    http = _Http(server)
    try:
        await http.call("DELETE", f"/v1/snapshots/{urllib.parse.quote(snapshot_id, safe='')}")
    finally:
        await http.aclose()


class RemoteSandbox(CodeMethods):
    """A sandbox owned by a NovaSandbox server (see the module's docstring). Made by
    ``AsyncSandbox.create(..., server=...)`` or ``AsyncSandbox.connect(id, ...)``."""

    def __init__(self, http: _Http, info: RemoteSandboxInfo) -> None:
        self._http = http
        self._info = info
        self._killed = False
        self.id = info.id
        self.template = info.template
        self.commands = RemoteCommands(self)
        self.files = RemoteFiles(self)
        self.pty = RemoteTerminals(self)
        self._code = CodeInterpreter(self.commands)
        self._since = time.monotonic() - max(0.0, time.time() - info.created_at)

    # --- creation

    @classmethod
    async def create(
        cls,
        template: str,
        *,
        server: Server,
        vcpus: int | None,
        memory_mib: int | None,
        env: Mapping[str, str] | None,
        cold: bool,
        timeout: float | None,
        network: str,
        allow: Sequence[str] | None,
        ports: Sequence[int],
        labels: Mapping[str, str] | None,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
    ) -> RemoteSandbox:
        """A new sandbox on ``server`` (``AsyncSandbox.create``'s arguments;
        ``from_snapshot``: one of the key's snapshots there, or its id)."""
        snapshot = None if from_snapshot is None else snapshot_id_for(from_snapshot, server)
        body = {
            "template": template,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "env": dict(validate_env(env)),
            "timeout": timeout,
            "network": str(network),
            "allow": None if allow is None else list(allow),
            "ports": list(ports),
            "labels": dict(labels or {}),
            "cold": cold,
        }
        if snapshot is not None:
            body["snapshot"] = snapshot
        http = _Http(server)
        try:
            reply = await http.call("POST", "/v1/sandboxes", json=body)
        except BaseException:
            await http.aclose()
            raise
        return cls(http, RemoteSandboxInfo.from_json(reply))

    @classmethod
    async def connect(cls, sandbox_id: str, *, server: Server) -> RemoteSandbox:
        """The sandbox ``sandbox_id`` of this key on ``server``."""
        if not isinstance(sandbox_id, str) or not sandbox_id or "/" in sandbox_id:
            raise ConfigError(f"a sandbox id is a non-empty string, got {sandbox_id!r}")
        http = _Http(server)
        try:
            reply = await http.call("GET", f"/v1/sandboxes/{sandbox_id}")
            info = RemoteSandboxInfo.from_json(reply)
            if info.state in ("killed", "crashed", "error"):
                raise error_of("sandbox-not-running", f"sandbox {sandbox_id} is {info.state}")
        except BaseException:
            await http.aclose()
            raise
        return cls(http, info)

    @staticmethod
    async def list_on(
        server: Server,
        labels: Mapping[str, str] | None = None,
        states: Sequence[str] = (),
    ) -> list[RemoteSandboxInfo]:
        """The key's sandboxes on ``server`` with all of ``labels`` (and in one of
        ``states``, if given)."""
        params: list[tuple[str, str]] = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
        params += [("state", str(s)) for s in states]
        http = _Http(server)
        try:
            reply = await http.call("GET", "/v1/sandboxes", params=params)
        finally:
            await http.aclose()
        try:
            return [RemoteSandboxInfo.from_json(d) for d in reply["sandboxes"]]
        except (KeyError, TypeError) as exc:
            raise RemoteError("the server sent a list in an unknown shape") from exc

    # --- what the server said

    @property
    def _base(self) -> str:
        return f"/v1/sandboxes/{self.id}"

    def _update(self, reply: Any) -> None:
        self._info = RemoteSandboxInfo.from_json(reply)

    def _check(self) -> None:
        """What ``_require_agent`` says locally once this client killed it."""
        if self._killed:
            raise SandboxNotRunning(f"sandbox {self.id} is killed")

    async def _call(self, method: str, url: str, *, path: str = "", **kwargs: Any) -> Any:
        self._check()
        try:
            return await self._http.call(method, self._base + url, path=path, **kwargs)
        except NovaSandboxError as exc:
            self._saw(exc)
            raise

    def _saw(self, exc: NovaSandboxError) -> None:
        ended = _ended_state(exc)
        if ended is not None and self._info.state != ended.value:
            expired = isinstance(exc, SandboxExpired) or self._info.expired
            self._info = _replace(self._info, state=ended.value, expired=expired)

    async def refresh(self) -> None:
        """Ask the server for the sandbox's state, lifetime and labels now."""
        self._update(await self._call("GET", ""))

    @property
    def server(self) -> str | None:
        """The URL of the server that owns it."""
        return self._http.server.url

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._info.labels)

    @property
    def state(self) -> SandboxState:
        """Its state as the server last said (``killed`` at once after ``kill``)."""
        if self._killed:
            return SandboxState.KILLED
        try:
            return SandboxState(self._info.state)
        except ValueError:
            return SandboxState.ERROR

    def is_running(self) -> bool:
        return self.state is SandboxState.RUNNING

    @property
    def expired(self) -> bool:
        return self._info.expired

    @property
    def crash_reason(self) -> str | None:
        return self._info.crash_reason

    @property
    def deadline(self) -> float | None:
        """When the lifetime ends (``time.time()`` seconds), or None for no limit."""
        return self._info.deadline

    @property
    def restored(self) -> bool:
        return self._info.restored

    @property
    def provider(self) -> str:
        return self._info.provider

    @property
    def node(self) -> str | None:
        """Through a cluster (``serve --ray``): the Ray node id it runs on."""
        return self._info.node

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._since

    def get_host(self, port: int) -> str:
        """``ADDRESS:PORT`` where the server's host reaches guest TCP ``port``."""
        self._check()
        where = self._info.ports.get(str(port))
        if where is None:
            raise ConfigError(
                f"port {port} is not forwarded (create with ports=[{port}]), or the "
                "sandbox is not running"
            )
        return where

    # --- lifecycle

    async def set_timeout(self, timeout: float | None) -> None:
        """Set the remaining lifetime to ``timeout`` seconds from now (None: no limit)."""
        self._update(await self._call("PUT", "/timeout", json={"timeout": timeout}))

    async def pause(self) -> None:
        self._update(await self._call("POST", "/pause"))

    async def resume(self) -> None:
        self._update(await self._call("POST", "/resume"))

    async def kill(self) -> None:
        """Kill it on the server. Safe to call twice; it also ends this client."""
        if self._killed:
            return
        try:
            await self._http.call("DELETE", self._base)
        except (errors.SandboxNotFound, SandboxNotRunning):
            pass  # ended meanwhile, or forgotten by the server: killed either way
        # (any other error, ServerUnreachable say, leaves it as it was: call kill again)
        self._killed = True
        await self._http.aclose()

    async def close(self) -> None:
        """Drop this client's connection; the sandbox runs on (``connect`` again)."""
        await self._http.aclose()

    async def __aenter__(self) -> RemoteSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    # --- snapshots, forks and signed URLs

    async def snapshot(self) -> RemoteSnapshot:
        """Save this sandbox (memory, processes, files) on the server as a snapshot of
        the key's; ``create(from_snapshot=..., server=...)`` restores it. It goes on
        running."""
        return RemoteSnapshot.from_json(await self._call("POST", "/snapshot"), self.server or "")

    async def fork(self, n: int = 1) -> list[RemoteSandbox]:
        """``n`` new sandboxes of the key's on the server that continue from this one's
        current state (memory, processes, files), with its labels; they outlive it."""
        check_int("fork count", n, 1, 64)
        reply = await self._call("POST", "/fork", json={"n": n})
        try:
            infos = [RemoteSandboxInfo.from_json(d) for d in reply["sandboxes"]]
        except (KeyError, TypeError) as exc:
            raise RemoteError("the server sent a list in an unknown shape") from exc
        return [RemoteSandbox(_Http(self._http.server), info) for info in infos]

    async def upload_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        """A URL that writes ``path`` in the sandbox (``PUT`` the file's bytes as the
        body) without the API key, for ``expires`` seconds (1 to 3600)."""
        return await self._signed_url("upload-url", path, expires)

    async def download_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        """A URL that reads ``path`` of the sandbox (``GET``) without the API key, for
        ``expires`` seconds (1 to 3600)."""
        return await self._signed_url("download-url", path, expires)

    async def _signed_url(self, kind: str, path: str, expires: int) -> str:
        path = check_guest_path(path)
        check_int("expires", expires, 1)  # the server has the upper bound
        params = {"path": path, "expires": str(expires)}
        reply = await self._call("POST", f"/files/{kind}", path=path, params=params)
        try:
            return str(reply["url"])
        except (KeyError, TypeError) as exc:
            raise RemoteError("the server sent a signed URL in an unknown shape") from exc

    # --- metrics

    async def get_metrics(self) -> SandboxMetrics:
        """Its resource use now (``AsyncSandbox.get_metrics``): the guest's CPU, memory and
        root disk, and the VMM's resident memory on the server's host."""
        return metrics_from_json(await self._call("GET", "/metrics"))

    # --- what a client does not get

    # --- the code interpreter (``code.py``: a layer over ``commands``)

    def _unsupported(self, what: str) -> NoReturn:
        raise RemoteUnsupported(f"{what} of a sandbox is not available through a server")

    @property
    def paths(self) -> NoReturn:
        self._unsupported("the host paths")

    @property
    def config(self) -> NoReturn:
        self._unsupported("the machine config")

    @property
    def accel(self) -> NoReturn:
        self._unsupported("the accelerator")

    @property
    def guest_kernel(self) -> NoReturn:
        self._unsupported("the guest kernel")

    @property
    def timings(self) -> NoReturn:
        self._unsupported("the boot timings")

    @property
    def cold_reason(self) -> NoReturn:
        self._unsupported("the cold-boot reason")

    @property
    def source_snapshot(self) -> NoReturn:
        self._unsupported("the source snapshot")

    def console_tail(self, lines: int = 40) -> NoReturn:
        self._unsupported("the console")

    async def network_log(self) -> NoReturn:
        self._unsupported("the network log")

    def __repr__(self) -> str:
        return f"<RemoteSandbox {self.id} template={self.template} state={self.state.value}>"


def metrics_from_json(d: Any) -> SandboxMetrics:
    """``SandboxMetrics`` from the server's JSON (``SandboxMetrics.to_json``)."""
    try:
        rss = d["vmm_rss"]
        return SandboxMetrics(
            cpu_used_pct=float(d["cpu_used_pct"]),
            cpu_count=int(d["cpu_count"]),
            mem_used=int(d["mem_used"]),
            mem_total=int(d["mem_total"]),
            disk_used=int(d["disk_used"]),
            disk_total=int(d["disk_total"]),
            vmm_rss=None if rss is None else int(rss),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError(f"the server sent metrics in an unknown shape: {exc}") from exc


def _replace(info: RemoteSandboxInfo, **changes: Any) -> RemoteSandboxInfo:
    values = {name: getattr(info, name) for name in RemoteSandboxInfo.__dataclass_fields__}
    values.update(changes)
    return RemoteSandboxInfo(**values)


# --------------------------------------------------------------------------- commands


_STREAMING: set[asyncio.Task[Any]] = set()
"""The tasks reading command streams (the event loop keeps only weak references)."""


class RemoteCommandHandle:
    """A command running in a server's sandbox (from ``commands.start``): its output comes
    as NDJSON events read by a task of this client; ``wait()`` returns the result."""

    def __init__(
        self,
        sandbox: RemoteSandbox,
        argv: list[str],
        timeout: float | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        max_output: int | None,
        on_data: Callable[[bytes], Any] | None = None,
    ) -> None:
        self._sb = sandbox
        self.argv = tuple(argv)
        self.pid = 0
        self._on_data = on_data
        """A terminal's: gets the bytes of its ``pty`` events."""
        self._timeout = timeout
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._buffers = {"stdout": bytearray(), "stderr": bytearray()}
        self._dropped = {"stdout": 0, "stderr": 0}
        self._max_output = max_output
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[tuple[CommandResult, bool]] | None = None
        self._attached = False

    async def _start(self, body: dict[str, Any], route: str = "/commands") -> None:
        """Start it (POST ``route`` with ``body``), or attach to a running one (its
        ``connect`` route), and return once the server said ``started``."""
        self._attached = route != "/commands"
        task = self._task = asyncio.get_running_loop().create_task(self._pump(body, route))
        # a handle nobody keeps still reads its stream (the command runs on as long as
        # this client does), and nobody waiting must not log "exception never retrieved"
        _STREAMING.add(task)
        task.add_done_callback(_STREAMING.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            self._task.cancel()
            raise

    async def _pump(self, body: dict[str, Any], route: str) -> tuple[CommandResult, bool]:
        sb = self._sb
        t0 = time.monotonic()
        try:
            async with sb._http.stream(
                "POST", f"{sb._base}{route}", json=body, timeout=_stream_timeout()
            ) as response:
                async for line in _lines(response):
                    event = _event(line)
                    kind = event.get("type")
                    if kind == "started":
                        self.pid = int(event["pid"])
                        if self._attached and isinstance(event.get("argv"), list):
                            self.argv = tuple(str(a) for a in event["argv"])
                        if not self._started.done():
                            self._started.set_result(None)
                    elif kind in ("stdout", "stderr"):
                        text = str(event.get("data", ""))
                        self._keep(kind, text)
                        await _call_back(self._callbacks[kind], text)
                    elif kind == "pty":
                        try:
                            data = base64.b64decode(str(event.get("data", "")), validate=True)
                        except ValueError as exc:
                            raise RemoteError(
                                f"the server sent a pty event that is not base64: {exc}"
                            ) from None
                        await _call_back(self._on_data, data)
                    elif kind == "exit":
                        return self._result(event, time.monotonic() - t0), bool(
                            event.get("timed_out")
                        )
                    elif kind == "error":
                        err = event.get("error") or {}
                        raise error_of(str(err.get("code")), str(err.get("message")))
            raise ServerUnreachable("the server ended a command's stream before its end")
        except NovaSandboxError as exc:
            sb._saw(exc)
            if not self._started.done():
                self._started.set_exception(exc)
            raise
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    def _keep(self, kind: str, text: str) -> None:
        data = text.encode()
        buf = self._buffers[kind]
        room = len(data) if self._max_output is None else self._max_output - len(buf)
        if room >= len(data):
            buf += data
            return
        if room > 0:
            buf += data[:room]
        self._dropped[kind] += len(data) - max(room, 0)

    def _result(self, event: Mapping[str, Any], elapsed: float) -> CommandResult:
        try:
            return CommandResult(
                argv=self.argv,
                exit_code=int(event["exit_code"]),
                stdout=self._buffers["stdout"].decode("utf-8", "replace"),
                stderr=self._buffers["stderr"].decode("utf-8", "replace"),
                stdout_dropped=self._dropped["stdout"],
                stderr_dropped=self._dropped["stderr"],
                signal=None if event.get("signal") is None else int(event["signal"]),
                duration=float(event.get("duration", elapsed)),
                missed=int(event.get("missed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server sent an exit event in an unknown shape: {exc}") from exc

    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def disconnect(self) -> None:
        """Stop getting the command's output and exit (the stream is closed); the command
        runs on if it was started in the background or this handle is a ``connect``'s.
        ``wait`` then raises ``CommandError``."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def wait(self, *, check: bool = False) -> CommandResult:
        """Wait for the command to end. Raises ``CommandTimeout`` if it ran past its timeout
        and, with ``check``, ``CommandFailed`` if it exited non-zero."""
        assert self._task is not None
        if self._task.cancelled():
            raise CommandError(f"this handle of command {self.pid} was disconnected")
        try:
            result, timed_out = await asyncio.shield(self._task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._task.cancelled() and (current is None or not current.cancelling()):
                raise CommandError(f"this handle of command {self.pid} was disconnected") from None
            raise
        if timed_out:
            raise CommandTimeout(
                f"command {shlex.join(self.argv)} ran past its {self._timeout} s timeout; "
                "its process group was killed",
                result,
            )
        if check and result.exit_code != 0:
            raise CommandFailed(result)
        return result

    @property
    def _url(self) -> str:
        return f"/commands/{self.pid}"

    async def send_stdin(self, data: str | bytes) -> None:
        """Feed the command's stdin (started with ``open_stdin=True``). Input for a
        command that has ended goes nowhere, without an error (as locally)."""
        blob = data.encode() if isinstance(data, str) else bytes(data)
        try:
            for i in range(0, len(blob), STDIN_CHUNK):
                if self.done():
                    return
                chunk = blob[i : i + STDIN_CHUNK]
                await self._sb._call("POST", f"{self._url}/stdin", content=chunk)
        except ProcessNotFound:
            pass  # it ended meanwhile

    async def close_stdin(self) -> None:
        """Signal end of input to the command."""
        if self.done():
            return
        try:
            await self._sb._call("POST", f"{self._url}/close-stdin")
        except ProcessNotFound:
            pass

    async def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the command's process group (no error if it already ended)."""
        if self.done():
            return
        try:
            await self._sb._call("POST", f"{self._url}/signal", json={"signal": int(sig)})
        except ProcessNotFound:
            pass  # it ended meanwhile

    async def kill(self) -> None:
        """SIGKILL the command's whole process group."""
        if self.done():
            return
        try:
            await self._sb._call("DELETE", self._url)
        except ProcessNotFound:
            pass


def _stream_timeout() -> httpx.Timeout:
    """A command may stay silent as long as it runs: no read timeout on its stream (the
    server ends it at the command's timeout)."""
    import httpx

    return httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=None)


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise RemoteError("the server sent a command event that is not JSON") from None
    if not isinstance(event, dict):
        raise RemoteError("the server sent a command event that is not an object")
    return event


class RemoteCommands:
    """``sandbox.commands`` of a ``RemoteSandbox``: ``AsyncCommands``'s methods."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        stdin: str | bytes | None = None,
        open_stdin: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> RemoteCommandHandle:
        """``AsyncCommands.start``. Without ``background`` the server kills the command
        if this client's stream of it ends early (the process exits, the connection
        breaks); with it the command runs on (signal or kill it by pid)."""
        argv = _normalize_argv(cmd)
        if not isinstance(background, bool):
            raise ConfigError(f"background must be True or False, got {background!r}")
        env_vars = dict(validate_env(env))
        user = validate_user(user)
        if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG):
            raise ConfigError(f"tag must be a string of at most {MAX_TAG} characters")
        if cwd is not None:
            cwd = check_guest_path(cwd, "cwd")
        timeout = validate_timeout(timeout)
        if stdin is not None and not isinstance(stdin, (str, bytes)):
            raise ConfigError("stdin must be str or bytes")
        max_output = validate_byte_count(max_output, "max_output")
        self._sb._check()
        raw = stdin if isinstance(stdin, bytes) else None
        body: dict[str, Any] = {
            "cmd": argv,
            "env": env_vars,
            "cwd": cwd,
            "timeout": None if timeout is None else float(timeout),
            "stdin": stdin if isinstance(stdin, str) else None,
            "open_stdin": open_stdin or raw is not None,
            "background": bool(background),
            "user": user,
            "tag": tag,
        }
        handle = RemoteCommandHandle(self._sb, argv, timeout, on_stdout, on_stderr, max_output)
        await handle._start(body)
        if raw is not None:  # bytes go up raw, then stdin closes (as locally)
            try:
                if raw:
                    await handle.send_stdin(raw)
                if not open_stdin:
                    await handle.close_stdin()
            except ProcessNotFound:
                pass  # it ended without reading them
        return handle

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: Literal[False] = ...,
        user: str | None = ...,
        tag: str | None = ...,
    ) -> CommandResult: ...
    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: Literal[True],
        user: str | None = ...,
        tag: str | None = ...,
    ) -> RemoteCommandHandle: ...
    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        check: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: bool = ...,
        user: str | None = ...,
        tag: str | None = ...,
    ) -> CommandResult | RemoteCommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        stdin: str | bytes | None = None,
        check: bool = False,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        background: bool = False,
        user: str | None = None,
        tag: str | None = None,
    ) -> CommandResult | RemoteCommandHandle:
        """``AsyncCommands.run``."""
        handle = await self.start(
            cmd,
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            max_output=max_output,
            background=background,
            user=user,
            tag=tag,
        )
        if background:
            return handle
        return await handle.wait(check=check)

    async def list(self) -> builtins.list[ProcessInfo]:
        """``AsyncCommands.list``."""
        reply = await self._sb._call("GET", "/commands")
        try:
            return [
                ProcessInfo(
                    pid=int(p["pid"]),
                    cmd=tuple(str(a) for a in p["cmd"]),
                    cwd=str(p["cwd"]),
                    user=str(p["user"]),
                    tag=None if p.get("tag") is None else str(p["tag"]),
                    stdin=bool(p["stdin"]),
                    started_at=float(p["started_at"]),
                )
                for p in reply["processes"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server sent processes in an unknown shape: {exc}") from exc

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
    ) -> RemoteCommandHandle:
        """``AsyncCommands.connect``: the command runs on when this client leaves."""
        pid = check_int("pid", pid, 1)
        max_output = validate_byte_count(max_output, "max_output")
        self._sb._check()
        handle = RemoteCommandHandle(self._sb, [], None, on_stdout, on_stderr, max_output)
        await handle._start({}, f"/commands/{pid}/connect")
        return handle

    async def send_signal(self, pid: int, sig: int) -> bool:
        """``AsyncCommands.send_signal``."""
        pid = check_int("pid", pid, 1)
        sig = check_int("signal", int(sig) if isinstance(sig, signal.Signals) else sig, 1, 64)
        try:
            await self._sb._call("POST", f"/commands/{pid}/signal", json={"signal": sig})
        except ProcessNotFound:
            return False
        return True

    async def kill(self, pid: int) -> bool:
        """``AsyncCommands.kill``."""
        pid = check_int("pid", pid, 1)
        try:
            await self._sb._call("DELETE", f"/commands/{pid}")
        except ProcessNotFound:
            return False
        return True

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """``AsyncCommands.send_stdin``."""
        pid = check_int("pid", pid, 1)
        if not isinstance(data, (str, bytes, bytearray)):
            raise ConfigError("data must be str or bytes")
        blob = data.encode() if isinstance(data, str) else bytes(data)
        for i in range(0, len(blob), STDIN_CHUNK):
            chunk = blob[i : i + STDIN_CHUNK]
            await self._sb._call("POST", f"/commands/{pid}/stdin", content=chunk)

    async def close_stdin(self, pid: int) -> None:
        """``AsyncCommands.close_stdin``."""
        pid = check_int("pid", pid, 1)
        await self._sb._call("POST", f"/commands/{pid}/close-stdin")


class RemoteTerminals:
    """``sandbox.pty`` of a ``RemoteSandbox``: ``AsyncTerminals``'s methods; the
    terminal's bytes come base64 in the command's stream."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def create(
        self,
        cols: int = DEFAULT_COLS,
        rows: int = DEFAULT_ROWS,
        *,
        on_data: DataCallback | None = None,
        cmd: str | Sequence[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        tag: str | None = None,
    ) -> AsyncTerminalHandle:
        """``AsyncTerminals.create``: the terminal runs on if this client goes away
        (reach it by pid); ``kill`` or ``exit`` ends it."""
        cols, rows = check_size(cols, rows)
        argv = _normalize_argv(list(LOGIN_SHELL) if cmd is None else cmd)
        env_vars = dict(validate_env(env))
        user = validate_user(user)
        if cwd is not None:
            cwd = check_guest_path(cwd, "cwd")
        timeout = validate_timeout(timeout)
        if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG):
            raise ConfigError(f"tag must be a string of at most {MAX_TAG} characters")
        self._sb._check()
        body: dict[str, Any] = {
            "cmd": argv,
            "env": env_vars,
            "cwd": cwd,
            "timeout": None if timeout is None else float(timeout),
            "open_stdin": True,
            "background": True,
            "user": user,
            "tag": tag,
            "pty": {"cols": cols, "rows": rows},
        }
        command = RemoteCommandHandle(self._sb, argv, timeout, None, None, 0, on_data=on_data)
        await command._start(body)
        return AsyncTerminalHandle(command, self.resize)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        """``AsyncTerminals.resize``."""
        cols, rows = check_size(cols, rows)
        pid = check_int("pid", pid, 1)
        await self._sb._call("POST", f"/commands/{pid}/resize", json={"cols": cols, "rows": rows})


# --------------------------------------------------------------------------- files


def _entry(d: Any) -> EntryInfo:
    try:
        check_value(ENTRY, d, "a file entry")
        return EntryInfo.from_agent(d)
    except (ProtocolError, AgentProtocolError) as exc:
        raise RemoteError(f"the server sent a file entry in an unknown shape: {exc}") from None


class RemoteFiles:
    """``sandbox.files`` of a ``RemoteSandbox``: ``AsyncFiles``'s methods, bytes moved
    raw over HTTP, a watch's events as NDJSON."""

    def __init__(self, sandbox: RemoteSandbox) -> None:
        self._sb = sandbox

    async def write(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None = None,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> int:
        """``AsyncFiles.write``: bytes go up raw in one request, a file or an iterator
        streamed as it is read."""
        return (await self._put(path, data, mode=mode, timeout=timeout, user=user))[0]

    async def _put(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None,
        timeout: float | None,
        user: str | None,
    ) -> tuple[int, dict[str, Any]]:
        content: bytes | AsyncIterator[bytes]
        check_data(data)
        if isinstance(data, str):
            content = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        else:
            content = data_chunks(data)
        path = check_guest_path(path)
        timeout = validate_timeout(timeout)
        params: dict[str, str] = _where(path, user)
        mode = validate_mode(mode)
        if mode is not None:
            params["mode"] = f"{mode:04o}"
        if timeout is not None:
            params["timeout"] = str(float(timeout))
        reply = await self._sb._call("PUT", "/files", path=path, params=params, content=content)
        return int(reply["size"]), reply

    async def write_files(
        self,
        files: Sequence[WriteEntry | Mapping[str, Any]],
        *,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> list[EntryInfo]:
        """``AsyncFiles.write_files``: one upload per file, in order."""
        entries = write_entries(files)
        timeout = validate_timeout(timeout)
        validate_user(user)
        deadline = None if timeout is None else time.monotonic() + timeout
        infos = []
        for entry in entries:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            _size, reply = await self._put(
                entry.path, entry.data, mode=entry.mode, timeout=left, user=user
            )
            infos.append(_entry(reply.get("entry")))
        return infos

    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["text"] = "text",
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> str: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["bytes"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> bytes: ...
    @overload
    async def read(
        self,
        path: str,
        *,
        format: Literal["stream"],
        max_size: int | None = ...,
        timeout: float | None = ...,
        user: str | None = ...,
    ) -> AsyncIterator[bytes]: ...

    async def read(
        self,
        path: str,
        *,
        format: Literal["text", "bytes", "stream"] = "text",
        max_size: int | None = DEFAULT_MAX_READ,
        timeout: float | None = DEFAULT_FILE_TIMEOUT,
        user: str | None = None,
    ) -> str | bytes | AsyncIterator[bytes]:
        """``AsyncFiles.read``: streamed down, stopped at ``max_size``."""
        if format not in ("text", "bytes", "stream"):
            raise ConfigError("format must be 'text', 'bytes' or 'stream'")
        path = check_guest_path(path)
        timeout = validate_timeout(timeout)
        max_size = validate_byte_count(max_size, "max_size")
        params = _where(path, user)
        if timeout is not None:
            params["timeout"] = str(float(timeout))
        if max_size is not None:  # the guest refuses a larger file before sending it
            params["max_size"] = str(max_size)
        self._sb._check()
        chunks = self._download(path, params, max_size)
        if format == "stream":
            return await prefetched(chunks)
        blob = bytearray()
        async for chunk in chunks:
            blob += chunk
        data = bytes(blob)
        return data if format == "bytes" else data.decode("utf-8", "replace")

    async def _download(
        self, path: str, params: dict[str, str], max_size: int | None
    ) -> AsyncGenerator[bytes, None]:
        sb = self._sb
        received = 0
        try:
            async with sb._http.stream(
                "GET", f"{sb._base}/files", path=path, params=params
            ) as response:
                async for chunk in _bytes(response):
                    received += len(chunk)
                    if max_size is not None and received > max_size:
                        raise FileTooLarge(f"{path} is larger than the {max_size}-byte limit", path)
                    yield chunk
        except NovaSandboxError as exc:
            sb._saw(exc)
            raise

    async def list(
        self,
        path: str,
        *,
        depth: int = 1,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        user: str | None = None,
    ) -> list[EntryInfo]:
        """``AsyncFiles.list``."""
        path = check_guest_path(path)
        depth = check_int("depth", depth, 1, MAX_LIST_DEPTH)
        max_entries = check_int("max_entries", max_entries, 1, MAX_ENTRIES)
        params = _where(path, user) | {"depth": str(depth), "max_entries": str(max_entries)}
        reply = await self._sb._call("GET", "/files/list", path=path, params=params)
        entries = reply.get("entries") if isinstance(reply, dict) else None
        if not isinstance(entries, list) or len(entries) > max_entries:
            raise RemoteError("the server sent a listing in an unknown shape")
        return [_entry(e) for e in entries]

    async def get_info(self, path: str, *, user: str | None = None) -> EntryInfo:
        """``AsyncFiles.get_info``."""
        path = check_guest_path(path)
        reply = await self._sb._call("GET", "/files/stat", path=path, params=_where(path, user))
        return _entry(reply)

    async def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        """``get_info`` (its former name)."""
        return await self.get_info(path, user=user)

    async def exists(self, path: str, *, user: str | None = None) -> bool:
        path = check_guest_path(path)
        reply = await self._sb._call("GET", "/files/exists", path=path, params=_where(path, user))
        return bool(reply["exists"])

    async def rename(self, old_path: str, new_path: str, *, user: str | None = None) -> EntryInfo:
        """``AsyncFiles.rename``."""
        old_path = check_guest_path(old_path)
        new_path = check_guest_path(new_path, "new_path")
        params = _where(old_path, user) | {"to": new_path}
        return _entry(await self._sb._call("POST", "/files/rename", path=old_path, params=params))

    async def make_dir(self, path: str, *, user: str | None = None) -> bool:
        """``AsyncFiles.make_dir``."""
        path = check_guest_path(path)
        reply = await self._sb._call("POST", "/files/mkdir", path=path, params=_where(path, user))
        return bool(reply["created"])

    async def remove(self, path: str, *, user: str | None = None) -> None:
        """Remove a file, or a directory with its contents."""
        path = check_guest_path(path)
        await self._sb._call("DELETE", "/files", path=path, params=_where(path, user))

    async def watch_dir(
        self,
        path: str,
        *,
        recursive: bool = False,
        on_event: WatchCallback | None = None,
        user: str | None = None,
    ) -> AsyncWatchHandle:
        """``AsyncFiles.watch_dir``: the events come as NDJSON on a stream this client
        holds open; ``stop()`` closes it, which ends the watch on the server."""
        if not isinstance(recursive, bool):
            raise ConfigError(f"recursive must be True or False, got {recursive!r}")
        if on_event is not None and not callable(on_event):
            raise ConfigError("on_event must be a function or None")
        path = check_guest_path(path)
        params = _where(path, user) | {"recursive": "true" if recursive else "false"}
        self._sb._check()
        handle = AsyncWatchHandle(path, on_event)
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle._attach(self._watch(handle, path, params, started), None)
        try:
            await asyncio.shield(started)
        except BaseException:
            await handle.stop()
            raise
        return handle

    async def _watch(
        self,
        handle: AsyncWatchHandle,
        path: str,
        params: dict[str, str],
        started: asyncio.Future[None],
    ) -> None:
        sb = self._sb
        try:
            async with sb._http.stream(
                "POST",
                f"{sb._base}/files/watch",
                path=path,
                params=params,
                timeout=_stream_timeout(),
            ) as response:
                async for line in _lines(response):
                    event = _event(line)
                    kind = event.get("type")
                    if kind == "watching":
                        handle.path = str(event.get("path") or path)
                        if not started.done():
                            started.set_result(None)
                    elif kind == "events":
                        await handle._arrived(_fs_events(event.get("events")), _count(event))
                    elif kind == "end":
                        handle._ended(_count(event))
                        return
                    elif kind == "error":
                        err = event.get("error") or {}
                        raise error_of(str(err.get("code")), str(err.get("message")))
            raise ServerUnreachable("the server ended a watch's stream before its end")
        except NovaSandboxError as exc:
            sb._saw(exc)
            if not started.done():
                started.set_exception(exc)
            raise
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise


def _fs_events(events: Any) -> list[FilesystemEvent]:
    if not isinstance(events, list):
        raise RemoteError("the server sent watch events in an unknown shape")
    try:
        for e in events:
            check_value(WATCH_EVENT, e, "a watch event")
    except ProtocolError as exc:
        raise RemoteError(f"the server sent a watch event in an unknown shape: {exc}") from None
    return [FilesystemEvent(e["name"], e["type"]) for e in events]


def _count(event: Mapping[str, Any]) -> int:
    n = event.get("dropped", 0)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def _where(path: str, user: str | None) -> dict[str, str]:
    """A file request's query: the path (relative ones are resolved by the server, under
    the home of the call's user) and the user, if the call names one."""
    user = validate_user(user)
    return {"path": path} if user is None else {"path": path, "user": user}


__all__ = [
    "ENV_API_KEY",
    "ENV_SERVER",
    "RemoteCommandHandle",
    "RemoteCommands",
    "RemoteFiles",
    "RemoteSandbox",
    "RemoteSandboxInfo",
    "RemoteSnapshot",
    "Server",
    "delete_snapshot_on",
    "error_from",
    "error_of",
    "list_snapshots_on",
    "resolve_server",
    "snapshot_id_for",
]
