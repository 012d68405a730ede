"""MCP (Model Context Protocol) tools for AI agents, over a ``Registry``'s sandboxes.

One implementation, two transports (the official ``mcp`` SDK's low-level server):

- ``serve_stdio``: ``novasandbox mcp``, the tools over the process's stdin and stdout,
  for the sandboxes of that process (an agent starts it as a subprocess);
- ``McpHttp``: ``novasandbox serve`` at ``/mcp`` over MCP's streamable HTTP transport,
  behind the server's API key (``app.Guard``): a sandbox made through it belongs to the
  key, like one made with ``POST /v1/sandboxes`` (same registry, same lists).

Tools: ``create_sandbox``, ``run_command``, ``write_file``, ``read_file``,
``list_files``, ``kill_sandbox`` (their JSON schemas are the pydantic models below). The
ones that act in a sandbox take an optional ``sandbox_id``; without one they use the
*session sandbox*, made on first use and killed when the MCP session ends: for stdio,
the process (its stdin closed, SIGTERM, SIGINT); over HTTP, the MCP session (the
client's DELETE, its idle timeout, the server's stop). A session sandbox's lifetime is
``SESSION_LIFETIME`` from its last use. HTTP clients that speak the session-less
protocol revision (2026-07-28) have no session: they pass ``sandbox_id``.

A failure comes back as a tool error (``isError``) whose text starts with the stable
code of the NovaSandbox error: ``sandbox-not-found: no sandbox 'x'``. Outputs are
bounded: ``run_command`` keeps at most ``max_output_bytes`` of each stream,
``read_file`` reads at most ``max_bytes``, ``list_files`` gives at most ``MAX_ENTRIES``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..config import check_guest_path
from ..errors import (
    CommandTimeout,
    ConfigError,
    NovaSandboxError,
    SandboxNotFound,
    SandboxNotRunning,
)
from ..files import locate
from ..remote import RemoteSandbox
from ..sandbox import DEFAULT_LIFETIME, AsyncSandbox
from .metrics import Metrics
from .registry import Registry

ToolSandbox = AsyncSandbox | RemoteSandbox
"""A sandbox the tools act on: one of this process (a single-host server, stdio), or one
a cluster server reaches on its node (``cluster/``)."""


class ToolOwned(Protocol):
    """What the tools need of a registry's entry (``registry.Owned`` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def sandbox(self) -> ToolSandbox: ...

    def live(self) -> ToolSandbox: ...

    def ended_error(self) -> NovaSandboxError | None: ...


class ToolRegistry(Protocol):
    """What the tools need of a registry (``registry.Registry`` is one)."""

    async def create(
        self, owner: str, labels: Mapping[str, str], **arguments: Any
    ) -> ToolOwned: ...

    def get(self, owner: str, sandbox_id: str) -> ToolOwned: ...

    async def kill(self, owner: str, sandbox_id: str) -> None: ...


async def _resolved(sb: ToolSandbox, path: str) -> str:
    """``path`` as the guest resolves it (relative: under the default user's home). A
    sandbox of another process resolves it there: ask it (the path must exist)."""
    if isinstance(sb, AsyncSandbox):
        return locate(sb, path, None)[1]
    return (await sb.files.get_info(path)).path


log = logging.getLogger("novasandbox.server.mcp")

KiB = 1 << 10
MiB = 1 << 20
# A result is sent twice (its JSON as text for the model, and as structured content), and
# the SDK's HTTP client takes events of at most 1 MiB: the largest results stay under it.
DEFAULT_MAX_OUTPUT = 32 * KiB
"""Bytes of each of stdout and stderr ``run_command`` returns unless asked otherwise."""
MAX_OUTPUT = 192 * KiB
DEFAULT_MAX_READ = 128 * KiB
MAX_READ = 256 * KiB
MAX_WRITE = 2 * MiB
"""Largest ``write_file`` content (bytes, once decoded); the HTTP body limit is 4 MiB."""
MAX_ENTRIES = 1000
MAX_COMMAND_TIMEOUT = 3600.0
SESSION_LIFETIME = 1800.0
"""Seconds a session sandbox lives after its last use (each use pushes it back)."""
LOCAL_OWNER = "local"
"""The owner of the sandboxes of ``novasandbox mcp`` (its registry is its own)."""
SESSION_LABELS = {"mcp": "session"}
CREATED_LABELS = {"mcp": "tool"}
_STATE_KEY = "novasandbox.session"


# --------------------------------------------------------------------------- inputs


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


SandboxId = Field(
    None,
    description="The sandbox to act in (from create_sandbox). Omit it to use this MCP "
    "session's own sandbox: made on first use, killed when the session ends.",
)


class CreateSandboxInput(_Input):
    template: str = Field("python", description="The template to start (e.g. 'python').")
    timeout_seconds: float = Field(
        DEFAULT_LIFETIME,
        gt=0,
        le=86400,
        description="Lifetime in seconds; the sandbox is killed when it ends.",
    )
    network: Literal["none", "nat"] = Field(
        "none", description="'none': no network device; 'nat': outbound network (NAT)."
    )
    allow: list[str] | None = Field(
        None,
        description="With network 'nat', the egress allow list (domains, addresses, CIDRs); "
        "null: the public internet, []: nothing.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of every command."
    )
    vcpus: int | None = Field(None, ge=1, description="vCPUs (default: the template's).")
    memory_mib: int | None = Field(
        None, ge=64, description="Memory in MiB (default: the template's)."
    )


class RunCommandInput(_Input):
    command: str = Field(
        min_length=1,
        description="A shell command line, run by bash as a login shell "
        "(e.g. 'python3 main.py | head').",
    )
    sandbox_id: str | None = SandboxId
    cwd: str | None = Field(
        None,
        description="Working directory (default: the home of the sandbox's user, /home/user "
        "in the python template; relative paths are under it).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    stdin: str | None = Field(None, description="Text sent to the command's stdin, then closed.")
    timeout_seconds: float = Field(
        60.0,
        gt=0,
        le=MAX_COMMAND_TIMEOUT,
        description="Seconds before the command (its whole process group) is killed.",
    )
    max_output_bytes: int = Field(
        DEFAULT_MAX_OUTPUT,
        ge=0,
        le=MAX_OUTPUT,
        description="Bytes of stdout and of stderr returned (the first ones); the rest is "
        "counted in stdout_truncated_bytes / stderr_truncated_bytes.",
    )


class WriteFileInput(_Input):
    path: str = Field(description="File path (absolute, or relative to the user's home).")
    content: str = Field(
        description=f"The file's content: text, or base64 with encoding 'base64'; at most "
        f"{MAX_WRITE} bytes."
    )
    encoding: Literal["utf-8", "base64"] = Field("utf-8", description="How content is given.")
    sandbox_id: str | None = SandboxId


class ReadFileInput(_Input):
    path: str = Field(description="File path (absolute, or relative to the user's home).")
    encoding: Literal["utf-8", "base64"] = Field(
        "utf-8",
        description="'utf-8': text (invalid bytes replaced); 'base64': the exact bytes.",
    )
    max_bytes: int = Field(
        DEFAULT_MAX_READ,
        ge=1,
        le=MAX_READ,
        description="Largest file read; a larger file is an error (file-too-large): read "
        "a part of it with run_command (head -c, tail -c, sed -n).",
    )
    sandbox_id: str | None = SandboxId


class ListFilesInput(_Input):
    path: str = Field(".", description="Directory (absolute, or relative to the user's home).")
    sandbox_id: str | None = SandboxId


class KillSandboxInput(_Input):
    sandbox_id: str = Field(description="The sandbox to kill (from create_sandbox).")


# --------------------------------------------------------------------------- outputs


class SandboxCreated(BaseModel):
    sandbox_id: str
    template: str
    expires_at: float | None = Field(description="Unix time its lifetime ends (null: never).")


class CommandOutput(BaseModel):
    sandbox_id: str
    exit_code: int = Field(description="The exit status (-1 when killed by a signal).")
    signal: int | None = Field(description="The signal that ended it, if one did.")
    stdout: str
    stderr: str
    stdout_truncated_bytes: int
    stderr_truncated_bytes: int
    duration_seconds: float


class FileWritten(BaseModel):
    sandbox_id: str
    path: str
    size: int


class FileRead(BaseModel):
    sandbox_id: str
    path: str
    encoding: Literal["utf-8", "base64"]
    size: int
    content: str


class Entry(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int


class FileList(BaseModel):
    sandbox_id: str
    path: str
    entries: list[Entry]
    truncated: int = Field(description="Entries left out (over the limit of the list).")


class SandboxKilled(BaseModel):
    sandbox_id: str
    killed: bool


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    input: type[BaseModel]
    output: type[BaseModel]
    read_only: bool = False
    destructive: bool = False

    def tool(self) -> types.Tool:
        return types.Tool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=self.input.model_json_schema(),
            output_schema=self.output.model_json_schema(),
            annotations=types.ToolAnnotations(
                title=self.title,
                read_only_hint=self.read_only,
                destructive_hint=self.destructive,
                open_world_hint=False,
            ),
        )


SESSION_NOTE = (
    " Without sandbox_id it uses this MCP session's sandbox (a 'python' one, made on "
    "first use, killed when the session ends)."
)
TOOLS = [
    ToolSpec(
        "create_sandbox",
        "Create a sandbox",
        "Start a new isolated Linux sandbox (a microVM) and return its sandbox_id, for the "
        "other tools' sandbox_id. It lives until kill_sandbox or the end of its lifetime "
        "(timeout_seconds), whatever happens to this session. Not needed for a single "
        "scratch environment: the other tools make one for the session when sandbox_id "
        "is omitted.",
        CreateSandboxInput,
        SandboxCreated,
    ),
    ToolSpec(
        "run_command",
        "Run a shell command",
        "Run a shell command line (bash, as a login shell) in a sandbox and wait for it: "
        "returns its exit code, stdout and stderr (each cut at max_output_bytes). A non-zero "
        "exit is a normal result, not a tool error; running past timeout_seconds is one "
        "(command-timeout, with the output so far)." + SESSION_NOTE,
        RunCommandInput,
        CommandOutput,
    ),
    ToolSpec(
        "write_file",
        "Write a file",
        "Write a file in a sandbox (parent directories created, an existing file "
        "replaced). Content is text, or base64 for binary data." + SESSION_NOTE,
        WriteFileInput,
        FileWritten,
    ),
    ToolSpec(
        "read_file",
        "Read a file",
        "Read a whole regular file of a sandbox, as text or base64, up to max_bytes."
        + SESSION_NOTE,
        ReadFileInput,
        FileRead,
        read_only=True,
    ),
    ToolSpec(
        "list_files",
        "List a directory",
        f"List a directory of a sandbox: name, type (file, dir, symlink, other) and size "
        f"of each entry (at most {MAX_ENTRIES})." + SESSION_NOTE,
        ListFilesInput,
        FileList,
        read_only=True,
    ),
    ToolSpec(
        "kill_sandbox",
        "Kill a sandbox",
        "Kill a sandbox now: its processes and files are gone. Killing this session's "
        "own sandbox is allowed: the next call without sandbox_id makes a new one.",
        KillSandboxInput,
        SandboxKilled,
        destructive=True,
    ),
]
TOOLS_BY_NAME = {t.name: t for t in TOOLS}


# --------------------------------------------------------------------------- sessions


@dataclass
class SessionScope:
    """The session sandbox of one MCP session (made on first use)."""

    owner: str
    sandbox_id: str | None = None
    closed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NoSession(ConfigError):
    """Not a public class: a call without ``sandbox_id`` on a connection that has no MCP
    session (the session-less protocol revision over HTTP). Code ``invalid-config``."""


def _request_key_id(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The public id of the API key of the HTTP request this message came with (None:
    not HTTP)."""
    request = ctx.request
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict):
        return None
    key = scope.get("state", {}).get("api_key")
    key_id = getattr(key, "id", None)
    if not isinstance(key_id, str):
        raise ConfigError("an MCP request over HTTP without an API key")  # Guard lets none by
    return key_id


def _connection(ctx: ServerRequestContext[Any, Any]) -> Connection:
    """The connection (the MCP session) a request came on. The SDK (2.x) gives handlers
    no public way to it; its ``exit_stack`` is the documented per-connection teardown."""
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise RuntimeError("the mcp SDK no longer exposes the request's connection")
    return connection


def _error_text(exc: NovaSandboxError) -> str:
    return f"{exc.code}: {exc.message}"


def _result(out: BaseModel) -> types.CallToolResult:
    data = out.model_dump(mode="json")
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(data, ensure_ascii=False))],
        structured_content=data,
    )


def _failed(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


class McpTools:
    """The tools over ``registry``. With ``local=True`` (stdio) every call is of the
    owner ``LOCAL_OWNER`` and the process is the session; otherwise (HTTP) the owner is
    the request's API key and the session is the MCP session of the connection."""

    def __init__(
        self, registry: ToolRegistry, *, local: bool = False, metrics: Metrics | None = None
    ) -> None:
        self.registry = registry
        self.local = local
        self.metrics = metrics
        """Where creates and commands are counted (the server's), if anywhere."""
        self.process_scope = SessionScope(LOCAL_OWNER) if local else None
        self.server: Server[Any] = Server(
            "novasandbox",
            version=__version__,
            title="NovaSandbox",
            instructions="Isolated Linux sandboxes (microVMs) to run code and commands in. "
            "run_command, write_file, read_file and list_files work in this session's own "
            "sandbox unless given a sandbox_id from create_sandbox.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    async def _list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[spec.tool() for spec in TOOLS])

    async def _call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        spec = TOOLS_BY_NAME.get(params.name)
        if spec is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"no tool named {params.name!r}")
        try:
            try:
                arguments = spec.input.model_validate(params.arguments or {})
            except ValidationError as exc:
                raise ConfigError(_validation_message(exc)) from None
            owner = self._owner(ctx)
            handler: Callable[[Any, str, ServerRequestContext[Any, Any]], Awaitable[BaseModel]]
            handler = getattr(self, f"_{spec.name}")
            return _result(await handler(arguments, owner, ctx))
        except CommandTimeout as exc:
            r = exc.result
            return _failed(
                f"{_error_text(exc)}\nstdout so far:\n{r.stdout}\nstderr so far:\n{r.stderr}"
            )
        except NovaSandboxError as exc:
            log.info("tool failed", extra={"fields": {"tool": spec.name, "code": exc.code}})
            return _failed(_error_text(exc))
        except Exception:
            log.exception("tool %s raised", spec.name)
            return _failed("internal-error: the tool failed unexpectedly (see the server's log)")

    def _owner(self, ctx: ServerRequestContext[Any, Any]) -> str:
        if self.local:
            return LOCAL_OWNER
        key_id = _request_key_id(ctx)
        if key_id is None:
            raise ConfigError("an MCP request without an API key")
        return key_id

    # --- which sandbox

    def _scope(self, ctx: ServerRequestContext[Any, Any], owner: str) -> SessionScope:
        if self.process_scope is not None:
            return self.process_scope
        connection = _connection(ctx)
        if connection.session_id is None:
            raise NoSession(
                "this MCP connection has no session (protocol revision "
                f"{connection.protocol_version} is session-less): pass sandbox_id, from "
                "create_sandbox"
            )
        scope = connection.state.get(_STATE_KEY)
        if not isinstance(scope, SessionScope):
            scope = SessionScope(owner)
            connection.state[_STATE_KEY] = scope
            connection.exit_stack.push_async_callback(self.end_session, scope)
        if scope.owner != owner:  # the SDK refuses another key's session id already
            raise SandboxNotFound("no sandbox for this session")
        return scope

    async def _sandbox(
        self, sandbox_id: str | None, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> ToolSandbox:
        if sandbox_id is not None:
            return self.registry.get(owner, sandbox_id).live()
        scope = self._scope(ctx, owner)
        async with scope.lock:
            if scope.closed:
                raise SandboxNotRunning("the MCP session has ended")
            if scope.sandbox_id is not None:
                owned = self._session_owned(scope)
                sb = owned.live() if owned is not None else None
                if sb is not None:
                    await self._keep_alive(sb)
                    return sb
            with self._creating():
                owned = await self.registry.create(
                    owner, SESSION_LABELS, template="python", timeout=SESSION_LIFETIME
                )
            if scope.closed:  # the session ended while it started
                await self.registry.kill(owner, owned.id)
                raise SandboxNotRunning("the MCP session has ended")
            scope.sandbox_id = owned.id
            log.info(
                "session sandbox created",
                extra={"fields": {"sandbox": owned.id, "key": owner}},
            )
            return owned.sandbox

    def _session_owned(self, scope: SessionScope) -> ToolOwned | None:
        """The session's sandbox; None if it was killed (a new one is made). One that
        ended on its own (lifetime, crash) raises its error once, and is forgotten."""
        assert scope.sandbox_id is not None
        try:
            owned = self.registry.get(scope.owner, scope.sandbox_id)
        except SandboxNotFound:
            scope.sandbox_id = None
            return None
        error = owned.ended_error()
        if error is not None:
            scope.sandbox_id = None
            error.message += "; the next call without sandbox_id makes a new session sandbox"
            error.args = (error.message,)
            raise error
        return owned

    def _command_error(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.command_error(code)

    def _creating(self) -> contextlib.AbstractContextManager[None]:
        return self.metrics.creating_one() if self.metrics is not None else contextlib.nullcontext()

    @staticmethod
    async def _keep_alive(sb: ToolSandbox) -> None:
        deadline = sb.deadline
        if deadline is not None and deadline - time.time() < SESSION_LIFETIME / 2:
            await sb.set_timeout(SESSION_LIFETIME)

    async def end_session(self, scope: SessionScope) -> None:
        """Kill the session's sandbox (the session ended). One being made now is killed
        by its maker when it is ready."""
        scope.closed = True
        async with scope.lock:
            sandbox_id, scope.sandbox_id = scope.sandbox_id, None
        if sandbox_id is None:
            return
        with contextlib.suppress(SandboxNotFound):
            await self.registry.kill(scope.owner, sandbox_id)
            log.info(
                "session sandbox killed",
                extra={"fields": {"sandbox": sandbox_id, "key": scope.owner}},
            )

    # --- the tools

    async def _create_sandbox(
        self, a: CreateSandboxInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> SandboxCreated:
        with self._creating():
            owned = await self.registry.create(
                owner,
                CREATED_LABELS,
                template=a.template,
                timeout=a.timeout_seconds,
                network=a.network,
                allow=a.allow,
                env=a.env,
                vcpus=a.vcpus,
                memory_mib=a.memory_mib,
            )
        sb = owned.sandbox
        return SandboxCreated(sandbox_id=sb.id, template=sb.template, expires_at=sb.deadline)

    async def _run_command(
        self, a: RunCommandInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> CommandOutput:
        sb = await self._sandbox(a.sandbox_id, owner, ctx)
        try:
            handle = await sb.commands.start(
                a.command,
                env=a.env,
                cwd=a.cwd,
                stdin=a.stdin,
                timeout=a.timeout_seconds,
                max_output=a.max_output_bytes,
            )
        except NovaSandboxError as exc:
            self._command_error(exc.code)
            raise
        if self.metrics is not None:
            self.metrics.commands.inc()
        try:
            r = await handle.wait()
        except (asyncio.CancelledError, anyio.get_cancelled_exc_class()):
            # the call was cancelled (by the client, or its session ended): so is the command
            with anyio.CancelScope(shield=True), contextlib.suppress(NovaSandboxError):
                await handle.kill()
            raise
        except CommandTimeout:
            raise
        except NovaSandboxError as exc:
            self._command_error(exc.code)
            raise
        return CommandOutput(
            sandbox_id=sb.id,
            exit_code=r.exit_code,
            signal=r.signal,
            stdout=r.stdout,
            stderr=r.stderr,
            stdout_truncated_bytes=r.stdout_dropped,
            stderr_truncated_bytes=r.stderr_dropped,
            duration_seconds=round(r.duration, 3),
        )

    async def _write_file(
        self, a: WriteFileInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> FileWritten:
        if a.encoding == "base64":
            try:
                data = base64.b64decode(a.content, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("content is not valid base64") from None
        else:
            data = a.content.encode()
        if len(data) > MAX_WRITE:
            raise ConfigError(f"content is {len(data)} bytes; write_file takes at most {MAX_WRITE}")
        check_guest_path(a.path)  # before a sandbox is made for it
        sb = await self._sandbox(a.sandbox_id, owner, ctx)
        if isinstance(sb, AsyncSandbox):
            path = await _resolved(sb, a.path)
            size = await sb.files.write(path, data)
        else:  # resolved where it runs, once it exists
            size = await sb.files.write(a.path, data)
            path = await _resolved(sb, a.path)
        return FileWritten(sandbox_id=sb.id, path=path, size=size)

    async def _read_file(
        self, a: ReadFileInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> FileRead:
        check_guest_path(a.path)
        sb = await self._sandbox(a.sandbox_id, owner, ctx)
        path = await _resolved(sb, a.path)
        data = await sb.files.read(path, format="bytes", max_size=a.max_bytes)
        if a.encoding == "base64":
            content = base64.b64encode(data).decode("ascii")
        else:
            content = data.decode("utf-8", "replace")
        return FileRead(
            sandbox_id=sb.id, path=path, encoding=a.encoding, size=len(data), content=content
        )

    async def _list_files(
        self, a: ListFilesInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> FileList:
        check_guest_path(a.path)
        sb = await self._sandbox(a.sandbox_id, owner, ctx)
        path = await _resolved(sb, a.path)
        found = sorted(await sb.files.list(path), key=lambda e: e.name)
        entries = [Entry(name=e.name, type=e.type, size=e.size) for e in found[:MAX_ENTRIES]]
        return FileList(
            sandbox_id=sb.id,
            path=path,
            entries=entries,
            truncated=max(0, len(found) - MAX_ENTRIES),
        )

    async def _kill_sandbox(
        self, a: KillSandboxInput, owner: str, ctx: ServerRequestContext[Any, Any]
    ) -> SandboxKilled:
        await self.registry.kill(owner, a.sandbox_id)
        return SandboxKilled(sandbox_id=a.sandbox_id, killed=True)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid arguments: " + ("; ".join(parts) or "invalid")


# --------------------------------------------------------------------------- transports


class McpHttp:
    """The tools as an ASGI app over MCP's streamable HTTP transport (stateful sessions;
    JSON-RPC over POST, server events over SSE). It runs behind ``app.Guard``, which
    authenticated the request: the key's id is the MCP principal, so a session can only
    be used with the key that opened it (the SDK answers 404 to any other). ``run`` is
    the session manager's lifespan: the app's lifespan enters it."""

    def __init__(self, registry: ToolRegistry, metrics: Metrics | None = None) -> None:
        self.tools = McpTools(registry, metrics=metrics)
        self.manager = StreamableHTTPSessionManager(
            app=self.tools.server,
            security_settings=None,  # no Host/Origin checks: every request needs the key
        )

    def run(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.manager.run()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = scope.get("state", {}).get("api_key")
        key_id = getattr(key, "id", None)
        if not isinstance(key_id, str):  # Guard lets no such request through
            raise RuntimeError("an MCP request reached the endpoint without an API key")
        token = AccessToken(token=key_id, client_id=key_id, scopes=[])
        await self.manager.handle_request(
            {**scope, "user": AuthenticatedUser(token)}, receive, send
        )


async def serve_stdio(provider: str | None = None) -> None:
    """``novasandbox mcp``: the tools over stdin and stdout until stdin closes, then
    every sandbox made through them is killed. On SIGTERM or SIGINT the sandboxes are
    killed and the process exits at once (status 0): the SDK reads stdin in a thread
    that nothing can interrupt, so waiting for it would wait for the client."""
    registry = Registry(provider)
    tools = McpTools(registry, local=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def serve() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await tools.server.run(
                read_stream, write_stream, tools.server.create_initialization_options()
            )

    sweeper = asyncio.ensure_future(registry.sweep_forever())
    serving = asyncio.ensure_future(serve())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sweeper.cancel()
        stopping.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the kills
            loop.add_signal_handler(sig, lambda: None)
        await registry.close()
    if serving.done():
        serving.result()  # its error, if it failed
        return
    log.info("stopped on a signal; the sandboxes were killed")
    logging.shutdown()
    os._exit(0)


__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_READ",
    "MAX_ENTRIES",
    "MAX_OUTPUT",
    "MAX_READ",
    "MAX_WRITE",
    "SESSION_LIFETIME",
    "TOOLS",
    "McpHttp",
    "McpTools",
    "serve_stdio",
]
