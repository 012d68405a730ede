"""The HTTP API (FastAPI): ``create_app(keys, registry)``.

Every route but ``/healthz`` needs ``Authorization: Bearer KEY``; without a valid key the
answer is 401 and the error body, whatever the path (so nothing tells which routes or
sandboxes exist). Every error has one shape, ``{"error": {"code": CODE, "message": ...}}``,
where CODE is the stable code of the NovaSandbox error (``ERROR_STATUS`` gives the HTTP
status of each class; none of our typed errors is a 500).

Routes (under ``/v1``; ``ID`` a sandbox id, ``PATH`` a guest path as the Python API takes
it: absolute, or relative to the home of the call's user; file routes take ``?user=`` and
``RunCommand`` a ``user``, the guest account the call acts as):

    POST   /v1/sandboxes                      create (CreateSandbox) -> 201 SandboxOut
    GET    /v1/sandboxes?label=K=V&state=S    the caller's sandboxes -> SandboxList
    GET    /v1/sandboxes/ID                   -> SandboxOut
    GET    /v1/sandboxes/ID/metrics           its resource use now -> MetricsOut
    GET    /v1/sandboxes?metrics=true         the list with each running one's metrics
                                              (null where it did not answer within
                                              LIST_METRICS_WAIT)
    DELETE /v1/sandboxes/ID                   kill -> 204 (?wait=false: 202 at once, the
                                              VM is killed in the background)
    PUT    /v1/sandboxes/ID/timeout           set the lifetime (SetTimeout) -> SandboxOut
    POST   /v1/sandboxes/ID/pause | /resume   -> SandboxOut
    POST   /v1/sandboxes/ID/commands          run (RunCommand) -> NDJSON events (streams.py)
    GET    /v1/sandboxes/ID/commands          the running commands started through the API
                                              (by any client) -> ProcessList
    POST   /v1/sandboxes/ID/commands/PID/connect      attach -> NDJSON events (it runs on
                                              when this client leaves)
    POST   /v1/sandboxes/ID/commands/PID/resize       (TerminalSize) its terminal's -> 204
    POST   /v1/sandboxes/ID/commands/PID/stdin        the raw body to its stdin -> 204
    POST   /v1/sandboxes/ID/commands/PID/close-stdin  end its stdin -> 204
    POST   /v1/sandboxes/ID/commands/PID/signal       (SendSignal) to its group -> 204
    DELETE /v1/sandboxes/ID/commands/PID              SIGKILL its group -> 204
    PUT    /v1/sandboxes/ID/files?path=PATH   upload: the raw request body -> Written
    GET    /v1/sandboxes/ID/files?path=PATH   download: raw bytes (&max_size=N: refuse more)
    DELETE /v1/sandboxes/ID/files?path=PATH   remove (recursively) -> 204
    GET    /v1/sandboxes/ID/files/list?path=PATH    (&depth=N&max_entries=N) -> EntryList
    GET    /v1/sandboxes/ID/files/stat?path=PATH    -> EntryOut
    GET    /v1/sandboxes/ID/files/exists?path=PATH  -> Exists
    POST   /v1/sandboxes/ID/files/mkdir?path=PATH   (with parents) -> MadeDir
    POST   /v1/sandboxes/ID/files/rename?path=OLD&to=NEW  (never over NEW) -> EntryOut
    POST   /v1/sandboxes/ID/files/watch?path=PATH   (&recursive=true&timeout=S) -> NDJSON
    GET    /metrics                           Prometheus text format (metrics.py)
    *      /mcp                               MCP over streamable HTTP (mcp.py)

Snapshots and forks (a snapshot belongs to the key that made it, like a sandbox):

    POST   /v1/sandboxes/ID/snapshot          -> 201 SnapshotOut
    POST   /v1/sandboxes  {"snapshot": SNAP}  restore one of the key's snapshots
    POST   /v1/sandboxes/ID/fork  (ForkSandbox {"n": N})  -> 201 SandboxList
    GET    /v1/snapshots                      the key's snapshots -> SnapshotList
    DELETE /v1/snapshots/SNAP                 -> 204

Signed URLs (``signed.py``): one file of one sandbox, without the key, for a while:

    POST   /v1/sandboxes/ID/files/upload-url?path=PATH&expires=S    -> SignedUrl (PUT)
    POST   /v1/sandboxes/ID/files/download-url?path=PATH&expires=S  -> SignedUrl (GET)
    PUT|GET /v1/signed/sandboxes/ID/files?path=..&owner=..&expires=..&signature=..
           (no Authorization; 403 signature-invalid / signed-url-expired)

Bodies are bounded: JSON requests by ``Settings.max_json_bytes``, uploads and downloads by
``Settings.max_file_bytes`` (413, ``file-too-large``). Uploads are streamed into the
sandbox as they arrive, downloads out of it as the client reads them.

Metrics (``metrics.py``): every request counts (method, route template, status), every
error response by its code, creates and commands where the routes run them.

Logs: one line per request (method, path, status, milliseconds, the key's public id);
never a key, a request or response body, an environment or file data (the library's own
DEBUG lines name the commands it starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import (
    AgentError,
    AgentTimeout,
    AmbiguousSandboxId,
    AuthenticationError,
    CommandError,
    CommandNotFound,
    ConfigError,
    FileTooLarge,
    HostMemoryExhausted,
    HostToolMissing,
    InvalidWorkingDirectory,
    NetworkError,
    NoSpaceLeft,
    NovaSandboxError,
    PoolClosed,
    ProcessNotFound,
    ProviderError,
    SandboxError,
    SandboxFileError,
    SandboxFileNotFound,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxPermissionError,
    ServerBusy,
    SignatureInvalid,
    SignedUrlExpired,
    SnapshotError,
    SnapshotNotFound,
    TemplateError,
    TemplateNotFound,
    VMStartError,
)
from ..files import (
    DEFAULT_FILE_TIMEOUT,
    DEFAULT_MAX_ENTRIES,
    EntryInfo,
    FilesystemEvent,
    locate,
    read_stream,
    write_stream_info,
)
from ..sandbox import SandboxState
from ..snapshots import Snapshot
from .admission import Admission, Limits, RequestLimit
from .keys import ApiKey, KeyStore
from .mcp import McpHttp
from .metrics import CONTENT_TYPE, Metrics, route_template
from .models import (
    CreateSandbox,
    EntryList,
    EntryOut,
    ErrorOut,
    Exists,
    ForkSandbox,
    MadeDir,
    MetricsOut,
    ProcessList,
    ProcessOut,
    RunCommand,
    SandboxList,
    SandboxOut,
    SendSignal,
    SetTimeout,
    SignedUrl,
    SnapshotList,
    SnapshotOut,
    TerminalSize,
    Written,
    check_labels,
    parse_label_filter,
)
from .registry import ENDED_STATES, Owned, Registry, ShuttingDown
from .signed import DEFAULT_EXPIRES, UrlSigner, check_expires
from .streams import NDJSON, QUEUED_EVENTS, CommandStream, Streamed, error_body

log = logging.getLogger("novasandbox.server")
access_log = logging.getLogger("novasandbox.server.access")

OPEN_PATHS = frozenset({"/healthz"})
"""The only paths served without an API key."""
UPLOAD_PATH = re.compile(r"/v1/(signed/)?sandboxes/[^/]+/files")
SIGNED_PATH = re.compile(r"/v1/signed/sandboxes/[^/]+/files")
"""Signed URLs (``signed.py``): served without an API key, their route checks the
signature."""
RETRY_AFTER = 5
LIST_METRICS_WAIT = 2.0
"""Seconds a list with ``?metrics=true`` waits for the sandboxes' metrics (all at once)."""
"""Seconds a client refused for lack of host memory is told to wait (``Retry-After``)."""

ERROR_STATUS: dict[type[NovaSandboxError], int] = {
    NovaSandboxError: 400,
    ConfigError: 422,
    AuthenticationError: 401,
    SignatureInvalid: 403,
    SignedUrlExpired: 403,
    TemplateError: 409,
    TemplateNotFound: 422,
    HostToolMissing: 503,
    ProviderError: 502,
    HostMemoryExhausted: 503,
    NetworkError: 422,
    VMStartError: 502,
    SandboxError: 409,
    SandboxNotFound: 404,
    AmbiguousSandboxId: 404,
    SandboxNotRunning: 409,
    ShuttingDown: 503,
    PoolClosed: 503,
    ServerBusy: 503,
    AgentError: 502,
    AgentTimeout: 504,
    CommandError: 409,
    CommandNotFound: 422,
    ProcessNotFound: 404,
    InvalidWorkingDirectory: 422,
    SnapshotError: 409,
    SnapshotNotFound: 404,
    SandboxFileError: 409,
    SandboxFileNotFound: 404,
    SandboxPermissionError: 403,
    FileTooLarge: 413,
    NoSpaceLeft: 507,
}
"""The HTTP status of each error class (the closest class in its MRO decides)."""

HTTP_CODES = {404: "not-found", 405: "method-not-allowed"}
"""Codes of the errors that are HTTP's own (a path or method the API does not have)."""


@dataclass(frozen=True, slots=True)
class Settings:
    max_file_bytes: int = 1 << 30
    """Largest upload or download (bytes)."""
    max_json_bytes: int = 16 << 20
    """Largest JSON request body (bytes)."""
    limits: Limits = field(default_factory=Limits.default)
    """Admission control: sandboxes, creates and requests at once (admission.py)."""


class ApiError(HTTPException):
    """A NovaSandbox error sent with a status of its own (not its class's). An
    ``HTTPException``, so that FastAPI passes it on when reading a body raises it."""

    def __init__(self, status: int, error: NovaSandboxError) -> None:
        super().__init__(status, error.message)
        self.error = error


def status_of(exc: NovaSandboxError) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 400


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if status == 503:
        headers["retry-after"] = str(RETRY_AFTER)
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _error(exc: NovaSandboxError, status: int | None = None) -> JSONResponse:
    return error_response(status or status_of(exc), exc.code, exc.message)


# --------------------------------------------------------------------------- the guard


def _bearer(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return str(token).strip()
    return ""


class Guard:
    """ASGI middleware in front of everything: the API key (401 for any path but
    ``OPEN_PATHS`` without a valid one), the size of JSON bodies, the access log and the
    count of requests (by the template of the route of ``routes`` they go to)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyStore,
        settings: Settings,
        metrics: Metrics,
        routes: Sequence[BaseRoute],
    ) -> None:
        self.app = app
        self.keys = keys
        self.settings = settings
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no WebSocket routes (yet): refused before anything
            await send({"type": "websocket.close", "code": 1008})
            return
        started = time.monotonic()
        status = 0
        key: ApiKey | None = None
        signed = SIGNED_PATH.fullmatch(scope["path"]) is not None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if signed:
                    message = {**message, "headers": [*message.get("headers", []), CORS_ORIGIN]}
            await send(message)

        try:
            if signed:  # no key: the route checks the URL
                if scope["method"] == "OPTIONS":
                    await send(_cors_preflight())
                    await send({"type": "http.response.body", "body": b""})
                    status = 204
                    return
            elif scope["path"] not in OPEN_PATHS:
                key = self.keys.verify(_bearer(scope))
                if key is None:
                    denied = AuthenticationError(
                        "a valid API key is required: Authorization: Bearer KEY"
                    )
                    self.metrics.error(denied.code)
                    await _error(denied)(scope, receive, sending)
                    return
                scope.setdefault("state", {})["api_key"] = key
            is_upload = scope["method"] == "PUT" and UPLOAD_PATH.fullmatch(scope["path"])
            if not is_upload:
                limit = self.settings.max_json_bytes
                if _content_length(scope) > limit:
                    too_large = ConfigError(f"the request body is over {limit} bytes")
                    self.metrics.error(too_large.code)
                    await _error(too_large, 413)(scope, receive, sending)
                    return
                receive = _bounded(receive, limit)
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(scope["method"], route_template(self.routes, scope), status)
            query = scope.get("query_string", b"").decode("latin-1")
            query = re.sub(r"(^|&)signature=[^&]*", r"\1signature=-", query)  # a credential
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "path": scope["path"] + (f"?{query}" if query else ""),
                        "status": status,
                        "ms": round((time.monotonic() - started) * 1000, 1),
                        "key": key.id if key else None,
                    }
                },
            )


CORS_ORIGIN = (b"access-control-allow-origin", b"*")
"""Signed URLs are their own credential (no cookie, no key): any web page may use one."""


def _cors_preflight() -> Message:
    """The answer to a browser's preflight of a signed URL (a cross-origin PUT)."""
    return {
        "type": "http.response.start",
        "status": 204,
        "headers": [
            CORS_ORIGIN,
            (b"access-control-allow-methods", b"GET, PUT"),
            (b"access-control-allow-headers", b"content-type"),
            (b"access-control-max-age", b"600"),
        ],
    }


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _bounded(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, ConfigError(f"the request body is over {limit} bytes"))
        return message

    return bounded


# --------------------------------------------------------------------------- the app


def caller(request: Request) -> ApiKey:
    key: ApiKey = request.state.api_key
    return key


Caller = Annotated[ApiKey, Depends(caller)]
GuestPath = Annotated[
    str, Query(description="A guest path: absolute, or under the home of the call's user.")
]
GuestUser = Annotated[
    str | None,
    Query(description="The guest account the call acts as (default: the template's user)."),
]
Seconds = Annotated[
    float, Query(allow_inf_nan=False, description="Seconds the whole transfer may take.")
]
Expires = Annotated[int, Query(description="Seconds the URL works (at most an hour).")]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut}
    for status in (400, 401, 403, 404, 409, 413, 422, 502, 503, 504, 507)
}


RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
"""The upload's body as the OpenAPI description has it: raw bytes (FastAPI cannot see
a body read from the request's stream)."""


def _entry(e: EntryInfo) -> EntryOut:
    return EntryOut(
        name=e.name,
        path=e.path,
        type=e.type,
        size=e.size,
        mode=e.mode,
        mtime=e.mtime,
        permissions=e.permissions,
        owner=e.owner,
        group=e.group,
        modified_time=e.modified_time,
        symlink_target=e.symlink_target,
    )


def _ndjson(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    parts = []
    status = 422
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            status = 400
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return status, "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, failed: Callable[[int, str, str], JSONResponse]) -> None:
    """Every error as ``{"error": {"code", "message"}}`` through ``failed`` (which counts
    it): ours by their class's status, FastAPI's and HTTP's own, and a bug as a 500."""

    @app.exception_handler(NovaSandboxError)
    async def on_error(request: Request, exc: NovaSandboxError) -> JSONResponse:
        return failed(status_of(exc), exc.code, exc.message)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return failed(exc.status_code, exc.error.code, exc.error.message)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return failed(status, ConfigError.code, message)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http-error")
        return failed(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return failed(500, "internal-error", "internal server error")


def create_app(
    keys: KeyStore,
    registry: Registry,
    settings: Settings | None = None,
    metrics: Metrics | None = None,
    signer: UrlSigner | None = None,
) -> FastAPI:
    """The API over ``registry``'s sandboxes, for the keys of ``keys`` (its metrics in
    ``metrics``, by default a registry of its own; ``app.state.metrics`` either way;
    signed URLs signed by ``signer``, by default with a secret of this app's own)."""
    settings = settings or Settings()
    metrics = metrics or Metrics(registry)
    signer = signer or UrlSigner(secrets.token_bytes(32))

    def failed(status: int, code: str, message: str) -> JSONResponse:
        metrics.error(code)
        return error_response(status, code, message)

    mcp = McpHttp(registry, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.adopt_all()  # what the last run left (restarts.)
        sweeper = asyncio.ensure_future(registry.sweep_forever())
        await registry.pools.start()  # warm pools (serve --pool) fill in the background
        try:
            async with mcp.run():  # MCP sessions end (their sandboxes killed) first
                yield
        finally:
            sweeper.cancel()
            await registry.close()

    app = FastAPI(
        title="NovaSandbox",
        version=__version__,
        description="Sandboxes (microVMs) owned by this server, per API key. "
        "Authenticate with `Authorization: Bearer KEY`.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
    )

    app.state.metrics = metrics

    def alive() -> int:
        return sum(n for state, n in registry.states().items() if state not in ENDED_STATES)

    admission = Admission(settings.limits, alive)
    app.state.admission = admission
    create_sandbox = admission.limit(registry.create)

    install_error_handlers(app, failed)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, str]:
        """Unauthenticated: whether the server answers."""
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["server"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Text format."}},
    )
    async def get_metrics(key: Caller) -> Response:
        """Prometheus metrics of the whole server (every key's sandboxes, counted
        together; no label names a key or a sandbox)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # --- sandboxes

    @app.post("/v1/sandboxes", status_code=201, tags=["sandboxes"])
    async def create(body: CreateSandbox, key: Caller) -> SandboxOut:
        labels = check_labels(body.labels)
        with metrics.creating_one():
            owned = await create_sandbox(
                key.id,
                labels,
                template=body.template,
                vcpus=body.vcpus,
                memory_mib=body.memory_mib,
                env=body.env,
                timeout=body.timeout,
                network=body.network,
                allow=body.allow,
                ports=body.ports,
                cold=body.cold,
                from_snapshot=registry.get_snapshot(key.id, body.snapshot)
                if body.snapshot is not None
                else None,
            )
        return SandboxOut(**owned.to_json())

    @app.get("/v1/sandboxes", tags=["sandboxes"])
    async def list_sandboxes(
        key: Caller,
        label: Annotated[list[str], Query(description="KEY=VALUE; all must match.")] = [],  # noqa: B006
        state: Annotated[list[str], Query(description="Only sandboxes in these states.")] = [],  # noqa: B006
        metrics: Annotated[
            bool, Query(description="Also each running one's metrics (bounded wait).")
        ] = False,
    ) -> SandboxList:
        wanted = parse_label_filter(label)
        states = []
        for s in state:
            try:
                states.append(SandboxState(s))
            except ValueError:
                names = ", ".join(m.value for m in SandboxState)
                raise ConfigError(f"state must be one of {names}, got {s!r}") from None
        found = registry.list(key.id, wanted, states)
        listed = [SandboxOut(**o.to_json()) for o in found]
        if metrics:
            measured = await asyncio.gather(*(_metrics_or_none(o) for o in found))
            for out, m in zip(listed, measured, strict=True):
                out.metrics = m
        return SandboxList(sandboxes=listed)

    async def _metrics_or_none(owned: Owned) -> MetricsOut | None:
        if owned.state is not SandboxState.RUNNING:
            return None
        try:
            m = await asyncio.wait_for(owned.live().get_metrics(), LIST_METRICS_WAIT)
        except (NovaSandboxError, TimeoutError):
            return None
        return MetricsOut(**m.to_json())

    @app.get("/v1/sandboxes/{sandbox_id}/metrics", tags=["sandboxes"])
    async def sandbox_metrics(sandbox_id: str, key: Caller) -> MetricsOut:
        m = await registry.get(key.id, sandbox_id).live().get_metrics()
        return MetricsOut(**m.to_json())

    @app.get("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def get(sandbox_id: str, key: Caller) -> SandboxOut:
        return SandboxOut(**registry.get(key.id, sandbox_id).to_json())

    @app.delete(
        "/v1/sandboxes/{sandbox_id}",
        status_code=204,
        tags=["sandboxes"],
        responses={202: {"description": "wait=false: killed in the background."}},
    )
    async def kill(
        sandbox_id: str,
        key: Caller,
        wait: Annotated[
            bool, Query(description="false: answer 202 at once, kill in the background.")
        ] = True,
    ) -> Response:
        await registry.kill(key.id, sandbox_id, wait=wait)
        return Response(status_code=204 if wait else 202)

    @app.put("/v1/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"])
    async def set_timeout(sandbox_id: str, body: SetTimeout, key: Caller) -> SandboxOut:
        owned = registry.get(key.id, sandbox_id)
        await owned.live().set_timeout(body.timeout)
        return SandboxOut(**owned.to_json())

    @app.post("/v1/sandboxes/{sandbox_id}/pause", tags=["sandboxes"])
    async def pause(sandbox_id: str, key: Caller) -> SandboxOut:
        owned = registry.get(key.id, sandbox_id)
        await owned.live().pause()
        return SandboxOut(**owned.to_json())

    @app.post("/v1/sandboxes/{sandbox_id}/resume", tags=["sandboxes"])
    async def resume(sandbox_id: str, key: Caller) -> SandboxOut:
        owned = registry.get(key.id, sandbox_id)
        await owned.live().resume()
        return SandboxOut(**owned.to_json())

    # --- commands

    @app.post(
        "/v1/sandboxes/{sandbox_id}/commands",
        tags=["commands"],
        status_code=200,
        response_class=Streamed,
        responses={200: {"content": {NDJSON: {}}, "description": "One JSON event per line."}},
    )
    async def run_command(sandbox_id: str, body: RunCommand, key: Caller) -> Streamed:
        """Run a command; its events stream back while it runs, one JSON object per
        line: `started` (pid), `stdout`/`stderr` (data, as it comes), then `exit`
        (exit_code, signal, timed_out, duration) or `error` (code, message). A client
        that disconnects gets its command killed. Errors before the command started
        (bad input, command not found) are ordinary error responses."""
        try:
            sb = registry.get(key.id, sandbox_id).live()
            stream = CommandStream(sb.id, on_error=metrics.command_error)
            if body.pty is not None:
                stream.handle = await sb.pty.create(
                    body.pty.cols,
                    body.pty.rows,
                    on_data=stream.terminal,
                    cmd=body.cmd,
                    env=body.env,
                    cwd=body.cwd,
                    user=body.user,
                    timeout=body.timeout,
                    tag=body.tag,
                )
            else:
                stream.handle = await sb.commands.start(
                    body.cmd,
                    env=body.env,
                    cwd=body.cwd,
                    timeout=body.timeout,
                    stdin=body.stdin,
                    open_stdin=body.open_stdin,
                    user=body.user,
                    tag=body.tag,
                    on_stdout=stream.stdout,
                    on_stderr=stream.stderr,
                    max_output=0,  # streamed, not kept
                )
        except NovaSandboxError as exc:
            metrics.command_error(exc.code)
            raise
        metrics.commands.inc()
        on_abort = None if body.background else stream.abort
        return Streamed(stream.events(), NDJSON, on_abort=on_abort)

    @app.get("/v1/sandboxes/{sandbox_id}/commands", tags=["commands"])
    async def list_commands(sandbox_id: str, key: Caller) -> ProcessList:
        """The commands started through the API (by any client) that still run."""
        found = await registry.get(key.id, sandbox_id).live().commands.list()
        return ProcessList(
            processes=[
                ProcessOut(
                    pid=p.pid,
                    cmd=list(p.cmd),
                    cwd=p.cwd,
                    user=p.user,
                    tag=p.tag,
                    stdin=p.stdin,
                    started_at=p.started_at,
                )
                for p in found
            ]
        )

    @app.post(
        "/v1/sandboxes/{sandbox_id}/commands/{pid}/connect",
        tags=["commands"],
        status_code=200,
        response_class=Streamed,
        responses={200: {"content": {NDJSON: {}}, "description": "One JSON event per line."}},
    )
    async def connect_command(sandbox_id: str, pid: int, key: Caller) -> Streamed:
        """Attach to running command PID: the events of a run (`started` with its argv,
        what it printed last, then its output as it comes, then `exit` with `missed`, the
        bytes this stream could not keep up with). The command runs on when this client
        disconnects."""
        sb = registry.get(key.id, sandbox_id).live()
        stream = CommandStream(sb.id)
        stream.handle = await sb.commands.connect(
            pid, on_stdout=stream.stdout, on_stderr=stream.stderr, max_output=0
        )
        return Streamed(stream.events(), NDJSON, on_abort=stream.detach)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/commands/{pid}/resize", status_code=204, tags=["commands"]
    )
    async def command_resize(
        sandbox_id: str, pid: int, body: TerminalSize, key: Caller
    ) -> Response:
        """Set the window size of running command PID's terminal (started with `pty`)."""
        await registry.get(key.id, sandbox_id).live().pty.resize(pid, body.cols, body.rows)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/commands/{pid}/stdin", status_code=204, tags=["commands"])
    async def command_stdin(sandbox_id: str, pid: int, request: Request, key: Caller) -> Response:
        """Send the raw request body to the stdin of running command PID (started with
        `open_stdin`)."""
        sb = registry.get(key.id, sandbox_id).live()
        data = await request.body()
        if len(data) > settings.max_file_bytes:
            raise FileTooLarge(f"stdin requests are at most {settings.max_file_bytes} bytes")
        await sb.commands.send_stdin(pid, data)
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/commands/{pid}/close-stdin",
        status_code=204,
        tags=["commands"],
    )
    async def command_close_stdin(sandbox_id: str, pid: int, key: Caller) -> Response:
        """End the stdin of running command PID."""
        await registry.get(key.id, sandbox_id).live().commands.close_stdin(pid)
        return Response(status_code=204)

    @app.post(
        "/v1/sandboxes/{sandbox_id}/commands/{pid}/signal", status_code=204, tags=["commands"]
    )
    async def command_signal(sandbox_id: str, pid: int, body: SendSignal, key: Caller) -> Response:
        """Send a signal to the process group of running command PID."""
        sb = registry.get(key.id, sandbox_id).live()
        if not await sb.commands.send_signal(pid, body.signal):
            raise ProcessNotFound(f"no running command with pid {pid} in sandbox {sb.id}")
        return Response(status_code=204)

    @app.delete("/v1/sandboxes/{sandbox_id}/commands/{pid}", status_code=204, tags=["commands"])
    async def command_kill(sandbox_id: str, pid: int, key: Caller) -> Response:
        """SIGKILL the process group of running command PID."""
        sb = registry.get(key.id, sandbox_id).live()
        if not await sb.commands.kill(pid):
            raise ProcessNotFound(f"no running command with pid {pid} in sandbox {sb.id}")
        return Response(status_code=204)

    # --- files

    @app.put("/v1/sandboxes/{sandbox_id}/files", tags=["files"], openapi_extra=RAW_BODY)
    async def upload(
        sandbox_id: str,
        path: GuestPath,
        request: Request,
        key: Caller,
        mode: Annotated[
            str | None, Query(pattern=r"^0?[0-7]{3,4}$", description="Octal, e.g. 755.")
        ] = None,
        timeout: Seconds = DEFAULT_FILE_TIMEOUT,
        user: GuestUser = None,
    ) -> Written:
        """Write the raw request body to PATH (parents created, file replaced), streamed
        into the sandbox as it arrives."""
        sb = registry.get(key.id, sandbox_id).live()
        resolved = locate(sb, path, user)[1]
        limit = settings.max_file_bytes
        if _content_length(request.scope) > limit:
            raise FileTooLarge(f"uploads are at most {limit} bytes", path)

        async def body() -> AsyncGenerator[bytes, None]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise FileTooLarge(f"uploads are at most {limit} bytes", path)
                if chunk:
                    yield chunk

        try:
            written = await write_stream_info(
                sb,
                path,
                body(),
                mode=None if mode is None else int(mode, 8),
                timeout=timeout,
                user=user,
            )
        except FileTooLarge:
            # over the bound mid-stream: the guest wrote what came before; a refused
            # upload leaves no partial file behind
            with contextlib.suppress(NovaSandboxError):
                await sb.files.remove(path, user=user)
            raise
        return Written(path=resolved, size=written.size, entry=_entry(written))

    @app.get(
        "/v1/sandboxes/{sandbox_id}/files",
        tags=["files"],
        status_code=200,
        response_class=Streamed,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def download(
        sandbox_id: str,
        path: GuestPath,
        key: Caller,
        timeout: Seconds = DEFAULT_FILE_TIMEOUT,
        max_size: Annotated[
            int | None, Query(ge=0, description="Refuse a larger file (file-too-large).")
        ] = None,
        user: GuestUser = None,
    ) -> Streamed:
        """The raw bytes of the regular file PATH, streamed out of the sandbox as the
        client reads them."""
        sb = registry.get(key.id, sandbox_id).live()
        limit = (
            settings.max_file_bytes if max_size is None else min(max_size, settings.max_file_bytes)
        )
        chunks = read_stream(sb, path, max_size=limit, timeout=timeout, user=user)
        try:
            first = await anext(chunks, b"")  # errors before any byte: a proper response
        except BaseException:
            await chunks.aclose()
            raise

        async def body() -> AsyncGenerator[bytes, None]:
            try:
                if first:
                    yield first
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()

        return Streamed(body(), "application/octet-stream")

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, tags=["files"])
    async def remove(
        sandbox_id: str, path: GuestPath, key: Caller, user: GuestUser = None
    ) -> Response:
        await registry.get(key.id, sandbox_id).live().files.remove(path, user=user)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", tags=["files"])
    async def list_dir(
        sandbox_id: str,
        path: GuestPath,
        key: Caller,
        user: GuestUser = None,
        depth: Annotated[int, Query(description="Levels to list (1 to 32).")] = 1,
        max_entries: Annotated[
            int, Query(description="More entries than this: too-many-entries.")
        ] = DEFAULT_MAX_ENTRIES,
    ) -> EntryList:
        """The entries of directory PATH and, to DEPTH levels, of its subdirectories."""
        sb = registry.get(key.id, sandbox_id).live()
        entries = await sb.files.list(path, depth=depth, max_entries=max_entries, user=user)
        return EntryList(entries=[_entry(e) for e in entries])

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", tags=["files"])
    async def stat(
        sandbox_id: str, path: GuestPath, key: Caller, user: GuestUser = None
    ) -> EntryOut:
        sb = registry.get(key.id, sandbox_id).live()
        return _entry(await sb.files.get_info(path, user=user))

    @app.get("/v1/sandboxes/{sandbox_id}/files/exists", tags=["files"])
    async def exists(
        sandbox_id: str, path: GuestPath, key: Caller, user: GuestUser = None
    ) -> Exists:
        sb = registry.get(key.id, sandbox_id).live()
        return Exists(exists=await sb.files.exists(path, user=user))

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=201, tags=["files"])
    async def make_dir(
        sandbox_id: str, path: GuestPath, key: Caller, user: GuestUser = None
    ) -> MadeDir:
        sb = registry.get(key.id, sandbox_id).live()
        resolved = locate(sb, path, user)[1]
        created = await sb.files.make_dir(path, user=user)
        return MadeDir(path=resolved, created=created)

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", tags=["files"])
    async def rename(
        sandbox_id: str,
        path: GuestPath,
        to: Annotated[str, Query(description="The new path (nothing there yet).")],
        key: Caller,
        user: GuestUser = None,
    ) -> EntryOut:
        """Rename PATH to TO; an existing TO is file-exists (nothing is replaced)."""
        sb = registry.get(key.id, sandbox_id).live()
        return _entry(await sb.files.rename(path, to, user=user))

    @app.post(
        "/v1/sandboxes/{sandbox_id}/files/watch",
        tags=["files"],
        status_code=200,
        response_class=Streamed,
        responses={200: {"content": {NDJSON: {}}, "description": "One JSON event per line."}},
    )
    async def watch_dir(
        sandbox_id: str,
        path: GuestPath,
        key: Caller,
        recursive: bool = False,
        user: GuestUser = None,
        timeout: Annotated[
            float | None,
            Query(gt=0, allow_inf_nan=False, description="End the watch after this many s."),
        ] = None,
    ) -> Streamed:
        """Watch directory PATH (and, with `recursive`, its subdirectories) until the
        client goes away or `timeout` seconds have passed: `watching` (path), then
        `events` (events: name relative to PATH, type create/write/remove/rename/chmod;
        dropped: events lost since the last line), then `end` (the directory went, or the
        timeout came) or `error`. Errors before the watch is in place (not found, not a
        directory, permission) are ordinary error responses."""
        sb = registry.get(key.id, sandbox_id).live()
        queue: asyncio.Queue[FilesystemEvent | None] = asyncio.Queue(QUEUED_EVENTS)
        handle = await sb.files.watch_dir(path, recursive=recursive, on_event=queue.put, user=user)

        async def ended() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handle.wait(), timeout)
            await queue.put(None)

        async def lines() -> AsyncGenerator[bytes, None]:
            finisher = asyncio.ensure_future(ended())
            reported = 0
            try:
                yield _ndjson({"type": "watching", "path": handle.path})
                done = False
                while not done:
                    got = [await queue.get()]
                    while not queue.empty() and got[-1] is not None:
                        got.append(queue.get_nowait())
                    done = got[-1] is None
                    events = [{"name": e.name, "type": e.type} for e in got if e is not None]
                    dropped, reported = handle.dropped - reported, handle.dropped
                    if events or dropped:
                        yield _ndjson({"type": "events", "events": events, "dropped": dropped})
                if handle.error is not None:
                    yield _ndjson({"type": "error", "error": error_body(handle.error)})
                else:
                    yield _ndjson({"type": "end", "dropped": handle.dropped - reported})
            finally:
                finisher.cancel()
                await handle.stop()

        return Streamed(lines(), NDJSON, on_abort=handle.stop)

    # --- snapshots and forks

    def _snapshot_out(snap: Snapshot) -> SnapshotOut:
        return SnapshotOut(
            id=snap.id,
            template=snap.template,
            created_at=snap.created_at,
            source_sandbox=snap.source_sandbox,
            vcpus=snap.vcpus,
            memory_mib=snap.memory_mib,
            network=snap.network,
            size_bytes=snap.size_bytes,
        )

    @app.post("/v1/sandboxes/{sandbox_id}/snapshot", status_code=201, tags=["snapshots"])
    async def snapshot(sandbox_id: str, key: Caller) -> SnapshotOut:
        """Save the sandbox (memory, processes, files) as a snapshot of the caller's; it
        goes on running. Restore it with `POST /v1/sandboxes {"snapshot": ID}`."""
        return _snapshot_out(await registry.snapshot(key.id, sandbox_id))

    @app.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
    async def fork(sandbox_id: str, body: ForkSandbox, key: Caller) -> SandboxList:
        """`n` new sandboxes of the caller's that continue from this one's current state
        (memory, processes, files); they outlive it."""
        labels = None if body.labels is None else check_labels(body.labels)
        made = await registry.fork(key.id, sandbox_id, body.n, labels)
        return SandboxList(sandboxes=[SandboxOut(**o.to_json()) for o in made])

    @app.get("/v1/snapshots", tags=["snapshots"])
    async def list_snapshots(key: Caller) -> SnapshotList:
        return SnapshotList(snapshots=[_snapshot_out(s) for s in registry.snapshots(key.id)])

    @app.delete("/v1/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(snapshot_id: str, key: Caller) -> Response:
        """Sandboxes restored from it go on running."""
        registry.delete_snapshot(key.id, snapshot_id)
        return Response(status_code=204)

    # --- signed URLs (signed.py)

    def signed_url(
        method: Literal["PUT", "GET"],
        sandbox_id: str,
        path: str,
        expires: int,
        request: Request,
        key: ApiKey,
    ) -> SignedUrl:
        # the file is read or written as the template's default user, whose home a
        # relative path is under
        resolved = locate(registry.get(key.id, sandbox_id).live(), path, None)[1]
        expires_at = int(time.time()) + check_expires(expires)
        url = signer.url(str(request.base_url), method, sandbox_id, resolved, key.id, expires_at)
        return SignedUrl(url=url, method=method, path=resolved, expires_at=expires_at)

    @app.post("/v1/sandboxes/{sandbox_id}/files/upload-url", tags=["files"])
    async def upload_url(
        sandbox_id: str,
        path: GuestPath,
        request: Request,
        key: Caller,
        expires: Expires = DEFAULT_EXPIRES,
    ) -> SignedUrl:
        """A URL that uploads PATH (PUT, the raw body) without the API key, until it
        expires."""
        return signed_url("PUT", sandbox_id, path, expires, request, key)

    @app.post("/v1/sandboxes/{sandbox_id}/files/download-url", tags=["files"])
    async def download_url(
        sandbox_id: str,
        path: GuestPath,
        request: Request,
        key: Caller,
        expires: Expires = DEFAULT_EXPIRES,
    ) -> SignedUrl:
        """A URL that downloads PATH (GET) without the API key, until it expires."""
        return signed_url("GET", sandbox_id, path, expires, request, key)

    def signed_key(
        method: str, sandbox_id: str, path: str, owner: str, expires: int, signature: str
    ) -> ApiKey:
        """The key a signed URL acts for, once its signature and expiry are checked."""
        signer.check(method, sandbox_id, path, owner, expires, signature)
        for k in keys.current():
            if k.id == owner:
                return k
        raise SignatureInvalid("the API key that signed this URL was removed")

    @app.put("/v1/signed/sandboxes/{sandbox_id}/files", tags=["signed"])
    async def signed_upload(
        sandbox_id: str,
        path: str,
        owner: str,
        expires: int,
        signature: str,
        request: Request,
    ) -> Written:
        """Upload (a URL from `upload-url`; no API key)."""
        k = signed_key("PUT", sandbox_id, path, owner, expires, signature)
        return await upload(sandbox_id, path, request, k, None, DEFAULT_FILE_TIMEOUT)

    @app.get(
        "/v1/signed/sandboxes/{sandbox_id}/files",
        tags=["signed"],
        status_code=200,
        response_class=Streamed,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def signed_download(
        sandbox_id: str, path: str, owner: str, expires: int, signature: str
    ) -> Streamed:
        """Download (a URL from `download-url`; no API key)."""
        k = signed_key("GET", sandbox_id, path, owner, expires, signature)
        return await download(sandbox_id, path, k, DEFAULT_FILE_TIMEOUT)

    # MCP over streamable HTTP (mcp.py): behind the Guard like every route
    app.router.routes.append(Route("/mcp", endpoint=mcp, include_in_schema=False))

    app.add_middleware(
        RequestLimit,
        admission=admission,
        refuse=lambda busy: failed(503, busy.code, busy.message),
        open_paths=OPEN_PATHS,
    )
    app.add_middleware(Guard, keys=keys, settings=settings, metrics=metrics, routes=app.routes)
    return app


__all__ = [
    "ERROR_STATUS",
    "ApiError",
    "Guard",
    "Settings",
    "create_app",
    "error_body",
    "install_error_handlers",
    "status_of",
]
