"""The cluster server's HTTP API: the single-host API (same paths, bodies, errors and
key handling), over sandboxes that run on the cluster's nodes.

- The **Guard** (API key first, body bounds, access log) and the request limit are the
  single-host server's own (``server/app.py``).
- ``POST /v1/sandboxes`` places the sandbox (``placement.py``) and creates it on that
  node; ``GET /v1/sandboxes`` and ``GET/DELETE /v1/sandboxes/ID`` are answered from the
  routing table (kept fresh from the nodes), with ``node`` in every description.
- **Everything else under a sandbox** (``/v1/sandboxes/ID/...``: commands and their
  streams, stdin, signals, terminals, files both ways, code, metrics, timeouts, pause)
  is relayed to the node's server as it comes: request bodies are streamed up, response
  bodies streamed down, a client that goes away closes the node's request (so its
  command is killed there, as on one host). Nothing is buffered whole.
- A sandbox whose node was lost answers every call with ``sandbox-lost`` (409), naming
  the node; a stream that was running when its node died ends with that error event.
- MCP at ``/mcp``: the same tools as one host's (``server/mcp.py``), each acting on its
  sandbox through the node's server (``ClusterTools``).
- **Snapshots and forks** stay on the node of the sandbox they come from (their files
  are there): a snapshot is kept there and restored there, a fork runs there, each
  within that node's room (else ``no-capacity``). Whose a snapshot is is kept on its
  node too (``registry.py``), so a restarted server lists them again.
- **Signed URLs** are the server's own (signed with its secret, ``<state>/server/
  url-secret``, pointing at the server): the node checks and resolves the path, the
  server signs it; using one relays the file to or from the node as it streams.
- ``GET /v1/cluster``: the nodes, their capacity, load and templates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..errors import (
    NoCapacity,
    NovaSandboxError,
    RemoteError,
    SandboxCrashed,
    SandboxExpired,
    SandboxLost,
    SandboxNotRunning,
    SignatureInvalid,
)
from ..remote import RemoteSandbox, RemoteSandboxInfo
from ..server.admission import Admission, RequestLimit
from ..server.app import (
    ERROR_STATUS,
    ERRORS,
    OPEN_PATHS,
    Caller,
    Expires,
    Guard,
    GuestPath,
    Settings,
    caller,
    error_response,
    install_error_handlers,
)
from ..server.keys import KeyStore
from ..server.mcp import McpHttp
from ..server.metrics import CONTENT_TYPE, Metrics
from ..server.models import (
    CreateSandbox,
    ForkSandbox,
    SandboxList,
    SandboxOut,
    SignedUrl,
    SnapshotList,
    SnapshotOut,
    check_labels,
    parse_label_filter,
)
from ..server.signed import DEFAULT_EXPIRES, UrlSigner
from .registry import ENDED, ClusterRegistry, Node, Routed, SnapRoute

log = logging.getLogger("novasandbox.cluster")

ERROR_STATUS.setdefault(NoCapacity, 503)

REQUEST_HEADERS = frozenset({b"content-type", b"content-length", b"accept"})
RESPONSE_HEADERS = frozenset({b"content-type", b"content-length", b"retry-after", b"cache-control"})
NDJSON = "application/x-ndjson"
GET_WAIT = 2.0
"""Seconds a sandbox's description waits for its node (then: what the server knows)."""


class _ToolEntry:
    """A routed sandbox as the MCP tools see one (``server.mcp.ToolOwned``)."""

    def __init__(self, registry: ClusterRegistry, routed: Routed, remote: RemoteSandbox) -> None:
        self._registry = registry
        self.routed = routed
        self._remote = remote

    @property
    def id(self) -> str:
        return self.routed.id

    @property
    def sandbox(self) -> RemoteSandbox:
        return self._remote

    def live(self) -> RemoteSandbox:
        self._registry.live(self.routed.owner, self.routed.id)  # SandboxLost, not found
        error = self.ended_error()
        if error is not None:
            raise error
        return self._remote

    def ended_error(self) -> NovaSandboxError | None:
        routed = self.routed
        if routed.lost:
            return routed.lost_error()
        info = routed.info
        if info.get("expired"):
            return SandboxExpired(
                f"sandbox {routed.id} reached the end of its lifetime and was killed; give "
                "it longer with the create's timeout or by setting its timeout"
            )
        if routed.state == "crashed":
            reason = str(info.get("crash_reason") or "")
            return SandboxCrashed(f"sandbox {routed.id} crashed: {reason}", reason)
        if routed.state in ENDED:
            return SandboxNotRunning(f"sandbox {routed.id} is {routed.state}")
        return None


class ClusterTools:
    """The cluster's sandboxes as the MCP tools' registry (``server.mcp.ToolRegistry``):
    each one a ``RemoteSandbox`` on its node's server, over the node's connection."""

    def __init__(self, registry: ClusterRegistry) -> None:
        self.registry = registry
        self._remotes: dict[str, RemoteSandbox] = {}

    async def create(self, owner: str, labels: Mapping[str, str], **arguments: Any) -> _ToolEntry:
        body = {k: v for k, v in arguments.items() if v is not None or k in ("timeout", "allow")}
        routed = await self.registry.create(owner, labels, body)
        for gone in set(self._remotes) - set(self.registry.routes):
            self._remotes.pop(gone, None)
        return self._entry(routed)

    def get(self, owner: str, sandbox_id: str) -> _ToolEntry:
        return self._entry(self.registry.get(owner, sandbox_id))

    async def kill(self, owner: str, sandbox_id: str) -> None:
        await self.registry.kill(owner, sandbox_id)
        self._remotes.pop(sandbox_id, None)

    def _entry(self, routed: Routed) -> _ToolEntry:
        remote = self._remotes.get(routed.id)
        if remote is None:
            node = self.registry.nodes.get(routed.node_id)
            if node is None or node.http is None:
                raise routed.lost_error()
            remote = RemoteSandbox(node.http, RemoteSandboxInfo.from_json(routed.to_json()))
            self._remotes[routed.id] = remote
        return _ToolEntry(self.registry, routed, remote)


SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A path segment the API has under a sandbox (``commands``, ``files``, ``stdin``, a
pid...): nothing that a URL parser could resolve elsewhere."""


def upstream_path(sandbox_id: str, rest: str) -> str:
    """The node's path for a request under ``/v1/sandboxes/ID/``: rebuilt from checked
    segments, never passed through as written. A node answers its key for every
    sandbox on it, so ``..``, ``.``, empty or encoded segments (which an HTTP client or
    the node could resolve to another sandbox) are refused here as an unknown path."""
    segments = rest.split("/")
    if not SEGMENT.fullmatch(sandbox_id) or not all(SEGMENT.fullmatch(p) for p in segments):
        raise HTTPException(404, "Not Found")
    return "/v1/sandboxes/" + "/".join([sandbox_id, *segments])


def _out(routed: Routed) -> SandboxOut:
    return SandboxOut(**routed.to_json())


def _snapshot_out(snap: SnapRoute) -> SnapshotOut:
    return SnapshotOut(**{k: v for k, v in snap.info.items() if k in SnapshotOut.model_fields})


class Relayed(Response):
    """A node's response passed on as it comes; the node's request is closed when the
    client goes away (or when it is done)."""

    def __init__(self, upstream: Any, on_lost: Any, lost: asyncio.Event) -> None:
        self.upstream = upstream
        self._lost = lost
        self.status_code = upstream.status_code
        self.background = None
        self.body = b""
        self.raw_headers = [
            (k.lower(), v) for k, v in upstream.headers.raw if k.lower() in RESPONSE_HEADERS
        ]
        self._on_lost = on_lost

    async def _pump(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        ndjson = dict(self.raw_headers).get(b"content-type", b"").startswith(NDJSON.encode())
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except Exception as exc:
            if not ndjson:
                raise
            error = self._on_lost(exc)
            event = {"type": "error", "error": {"code": error.code, "message": error.message}}
            line = json.dumps(event).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({pump, watch, lost}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
            elif lost.done():  # its node was declared lost: the stream ends with that
                await self.upstream.aclose()
                await pump  # the read fails now: the error event (NDJSON) is sent
        finally:
            for task in (watch, pump, lost):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.upstream.aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_cluster_app(
    keys: KeyStore,
    registry: ClusterRegistry,
    settings: Settings | None = None,
    signer: UrlSigner | None = None,
) -> FastAPI:
    """The API over the cluster's sandboxes (``registry``), for the keys of ``keys``
    (signed URLs signed by ``signer``; by default with a secret of this app's own)."""
    settings = settings or Settings()
    signer = signer or UrlSigner(secrets.token_bytes(32))
    metrics = Metrics(registry)  # type: ignore[arg-type]
    registry.metrics_into(metrics.registry)

    def failed(status: int, code: str, message: str) -> JSONResponse:
        metrics.error(code)
        return error_response(status, code, message)

    mcp = McpHttp(ClusterTools(registry), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        try:
            async with mcp.run():
                yield
        finally:
            await registry.close()

    app = FastAPI(
        title="NovaSandbox (cluster)",
        version=__version__,
        description="Sandboxes on the nodes of a Ray cluster, per API key. "
        "Authenticate with `Authorization: Bearer KEY`.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.metrics = metrics
    app.state.registry = registry

    def alive() -> int:
        return sum(1 for r in registry.routes.values() if r.state not in ENDED)

    admission = Admission(settings.limits, alive)
    app.state.admission = admission
    create_sandbox = admission.limit(registry.create)

    install_error_handlers(app, failed)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def get_metrics(key: Caller) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/cluster", tags=["cluster"])
    async def cluster_status(key: Caller) -> dict[str, Any]:
        """The nodes: state, capacity, what their sandboxes hold, templates ready."""
        return {
            "nodes": registry.status(),
            "sandboxes": len(registry.routes),
            "placement": {
                "policy": f"best of {registry.k} random eligible nodes by free memory",
                "decisions": registry.placements,
                "decision_seconds": registry.placement_seconds,
            },
        }

    @app.post("/v1/sandboxes", status_code=201, tags=["sandboxes"])
    async def create(body: CreateSandbox, key: Caller) -> SandboxOut:
        labels = check_labels(body.labels)
        data = body.model_dump(exclude={"labels"})
        with metrics.creating_one():
            routed = await create_sandbox(key.id, labels, data)
        return _out(routed)

    @app.get("/v1/sandboxes", tags=["sandboxes"])
    async def list_sandboxes(
        key: Caller,
        label: Annotated[list[str], Query()] = [],  # noqa: B006
        state: Annotated[list[str], Query()] = [],  # noqa: B006
        metrics: bool = False,
    ) -> SandboxList:
        wanted = parse_label_filter(label)
        return SandboxList(sandboxes=[_out(r) for r in registry.list(key.id, wanted, state)])

    @app.get("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"])
    async def get(sandbox_id: str, key: Caller) -> SandboxOut:
        routed = registry.get(key.id, sandbox_id)
        with contextlib.suppress(NovaSandboxError, TimeoutError):
            _, node = registry.live(key.id, sandbox_id)
            assert node.http is not None
            reply = await asyncio.wait_for(
                node.http.call("GET", f"/v1/sandboxes/{sandbox_id}"), GET_WAIT
            )
            registry.observe(routed, reply)
        return _out(routed)

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
    async def kill(sandbox_id: str, key: Caller, wait: bool = True) -> Response:
        await registry.kill(key.id, sandbox_id)
        return Response(status_code=204)

    # --- snapshots and forks: on the node of the sandbox they come from

    @app.post("/v1/sandboxes/{sandbox_id}/snapshot", status_code=201, tags=["snapshots"])
    async def snapshot(sandbox_id: str, key: Caller) -> SnapshotOut:
        return _snapshot_out(await registry.snapshot(key.id, sandbox_id))

    @app.post("/v1/sandboxes/{sandbox_id}/fork", status_code=201, tags=["snapshots"])
    async def fork(sandbox_id: str, body: ForkSandbox, key: Caller) -> SandboxList:
        labels = None if body.labels is None else check_labels(body.labels)
        with metrics.creating_one():
            made = await registry.fork(key.id, sandbox_id, body.n, labels)
        return SandboxList(sandboxes=[_out(r) for r in made])

    @app.get("/v1/snapshots", tags=["snapshots"])
    async def list_snapshots(key: Caller) -> SnapshotList:
        return SnapshotList(snapshots=[_snapshot_out(s) for s in registry.list_snapshots(key.id)])

    @app.delete("/v1/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(snapshot_id: str, key: Caller) -> Response:
        await registry.delete_snapshot(key.id, snapshot_id)
        return Response(status_code=204)

    # --- signed URLs: the node resolves and checks the path, the server signs

    async def signed_url(
        method: Literal["PUT", "GET"],
        sandbox_id: str,
        path: str,
        expires: int,
        request: Request,
        key: Any,
    ) -> SignedUrl:
        _, node = registry.live(key.id, sandbox_id)
        assert node.http is not None
        which = "upload-url" if method == "PUT" else "download-url"
        reply = await node.http.call(
            "POST",
            f"/v1/sandboxes/{sandbox_id}/files/{which}",
            params={"path": path, "expires": expires},
        )
        resolved, expires_at = str(reply["path"]), int(reply["expires_at"])
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
        return await signed_url("PUT", sandbox_id, path, expires, request, key)

    @app.post("/v1/sandboxes/{sandbox_id}/files/download-url", tags=["files"])
    async def download_url(
        sandbox_id: str,
        path: GuestPath,
        request: Request,
        key: Caller,
        expires: Expires = DEFAULT_EXPIRES,
    ) -> SignedUrl:
        return await signed_url("GET", sandbox_id, path, expires, request, key)

    async def signed(request: Request) -> Response:
        """A signed URL used (no API key): checked, then relayed to the sandbox's node
        as the key that signed it."""
        sandbox_id = request.path_params["sandbox_id"]
        q = request.query_params
        try:
            path, owner, signature = q["path"], q["owner"], q["signature"]
            expires = int(q["expires"])
        except (KeyError, ValueError) as exc:
            raise SignatureInvalid("the URL lacks its path, owner, expires or signature") from exc
        signer.check(request.method, sandbox_id, path, owner, expires, signature)
        if not any(k.id == owner for k in keys.current()):
            raise SignatureInvalid("the API key that signed this URL was removed")
        routed, node = registry.live(owner, sandbox_id)
        target = upstream_path(sandbox_id, "files")
        return await _relay(request, target, routed, node, query=urlencode({"path": path}))

    async def relay(request: Request) -> Response:
        key = caller(request)
        sandbox_id = request.path_params["sandbox_id"]
        path = upstream_path(sandbox_id, request.path_params["rest"])
        routed, node = registry.live(key.id, sandbox_id)
        return await _relay(request, path, routed, node)

    async def _relay(
        request: Request, path: str, routed: Routed, node: Node, query: str | None = None
    ) -> Response:
        import httpx

        assert node.http is not None
        client = node.http._client
        headers = [(k, v) for k, v in request.headers.raw if k.lower() in REQUEST_HEADERS]
        content: AsyncGenerator[bytes, None] | None = None
        if request.method in ("POST", "PUT", "PATCH"):
            content = request.stream()
        raw_query = request.scope.get("query_string", b"") if query is None else query.encode()
        url = httpx.URL(path, query=raw_query)
        upstream_request = client.build_request(
            request.method,
            url,
            headers=headers,
            content=content,
            timeout=httpx.Timeout(None, connect=5.0),
        )

        def lost(exc: BaseException) -> NovaSandboxError:
            if routed.lost:
                return routed.lost_error()
            return SandboxLost(
                f"the connection to sandbox {routed.id}'s node {routed.node_id} broke: "
                f"{type(exc).__name__}",
                routed.node_id,
            )

        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            if routed.lost:
                raise routed.lost_error() from exc
            raise RemoteError(
                f"sandbox {routed.id}'s node {routed.node_id} did not answer: {exc}"
            ) from exc
        return Relayed(upstream, lost, node.lost_event)

    app.router.routes.append(Route("/mcp", endpoint=mcp, include_in_schema=False))
    app.router.routes.append(
        Route(
            "/v1/signed/sandboxes/{sandbox_id}/files",
            endpoint=signed,
            methods=["GET", "PUT"],
            include_in_schema=False,
        )
    )
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        app.router.routes.append(
            Route(
                "/v1/sandboxes/{sandbox_id}/{rest:path}",
                endpoint=relay,
                methods=[method],
                include_in_schema=False,
            )
        )

    app.add_middleware(
        RequestLimit,
        admission=admission,
        refuse=lambda busy: failed(503, busy.code, busy.message),
        open_paths=OPEN_PATHS,
    )
    app.add_middleware(Guard, keys=keys, settings=settings, metrics=metrics, routes=app.routes)
    return app


__all__ = ["ClusterTools", "create_cluster_app", "upstream_path"]
