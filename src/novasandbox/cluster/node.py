"""The node agent: one per Ray node that advertises a ``novasandbox`` resource.

The cluster server (``serve --ray``) starts it as a *detached, named* Ray actor pinned to
its node (``NodeAffinitySchedulingStrategy``, not soft), so it outlives a restart of the
server, which finds it again by name. It owns that host's sandboxes and warm pools
through the single-host library, by running the ordinary single-host server
(``server.serve.build_app``: the same routes, streams, limits and adoption) on the node's
own address, on a port of its own choosing, in a thread of the actor's process:

- **One key.** The server talks to it with a key of its own (``cluster.key`` in the
  node's state directory, mode 0600, reused by a restarted node agent so that the
  sandboxes it adopts stay its key's). Nothing else holds that key; clients never talk
  to a node. The key crosses the cluster's network in clear text (plain HTTP, like
  Ray's own traffic): a Ray cluster's network must be private (see the README).
- **Whose a sandbox is** lives on the node, in the sandbox's label ``novasandbox.owner``
  (the client's key id), so that a restarted server rebuilds who owns what, and where,
  from the nodes alone. Whose a snapshot is (made through the server) is kept here too,
  in ``snapshot-owners.json`` next to the node's snapshots (``snapshot_owners``).
- **Templates**: the ones the server names (``serve --ray --template NAME``) are built
  on every node when its agent starts (from the server's definition, parents first);
  a sandbox is placed only where its template is built (``info()["templates"]``).
- **Its own state directory**: ``<state>/node-<address>`` (``NOVASANDBOX_STATE_DIR`` of
  the node's Ray processes, or the default), so several nodes on one machine (the
  tests' network namespaces) keep apart.

Ray is imported only here and in ``cluster/``; the class is plain Python, made an actor
by ``remote_class()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("novasandbox.cluster.node")

NAMESPACE = "novasandbox"
"""The Ray namespace of the node agents (their names are ``node-<ray node id>``)."""
KEY_NAME = "cluster"
KEY_FILE = "cluster.key"
OWNER_LABEL = "novasandbox.owner"
"""The label that says, on a node, which client key a sandbox belongs to."""
SNAPSHOT_OWNERS = "snapshot-owners.json"
START_WAIT = 60.0
"""Seconds the node agent waits for its server to listen."""


def actor_name(node_id: str) -> str:
    return f"node-{node_id}"


@dataclass(frozen=True)
class NodeConfig:
    """What the cluster server asks of every node agent (one value, sent to each)."""

    provider: str | None = None
    """The provider its sandboxes run on (None: the node's default)."""
    pools: dict[str, int] = field(default_factory=dict)
    """{template: N} warm sandboxes kept ready on every node."""
    prestart: dict[str, int] = field(default_factory=dict)
    """{template: N} VMMs started ahead on every node (``serve --prestart``)."""
    max_file_bytes: int = 1 << 30
    state_dir: str | None = None
    """Where the node keeps its state (None: ``NOVASANDBOX_STATE_DIR`` of its Ray
    processes, or the default); the node's own folder ``node-<address>`` is made in it."""
    cache_dir: str | None = None
    """The template cache (None: the node's default)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment the node agent sets for itself first (tests: the in-process
    provider's switch)."""
    templates: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    """Templates every node builds when it starts, parents first: (name, its definition's
    TOML table; None for one every node defines, such as ``python``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeConfig:
        data = dict(data)
        data["templates"] = [(str(n), d) for n, d in data.get("templates", [])]
        return cls(**data)


def node_state_dir(config: NodeConfig, address: str) -> Path:
    from ..paths import state_dir

    base = Path(config.state_dir) if config.state_dir else state_dir()
    return base / f"node-{address.replace(':', '_')}"


def _node_key(state: Path) -> str:
    """This node's key: the one a node agent before it kept (if its record is still
    there), else a new one (the old record replaced)."""
    from ..server.keys import KeyStore

    keys = KeyStore(state)
    path = state / KEY_FILE
    with contextlib.suppress(OSError):
        secret = path.read_text().strip()
        found = keys.verify(secret)
        if found is not None and found.name == KEY_NAME:
            return secret
    with contextlib.suppress(Exception):
        keys.remove(KEY_NAME)
    _, secret = keys.create(KEY_NAME)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


class NodeAgent:
    """The node agent (a Ray actor: ``remote_class()``). Its methods are what the
    cluster server asks of a node; sandboxes themselves are reached over HTTP at
    ``info()["url"]``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray

        self.config = NodeConfig.from_json(config)
        for name, value in self.config.env.items():
            os.environ[name] = value
        if self.config.cache_dir:
            os.environ["NOVASANDBOX_CACHE_DIR"] = self.config.cache_dir
        context = ray.get_runtime_context()
        self.node_id: str = context.get_node_id()
        self.address: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.state = node_state_dir(self.config, self.address)
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.environ["NOVASANDBOX_STATE_DIR"] = str(self.state)
        self.draining = False
        self._owners_lock = threading.Lock()
        self.started_at = time.time()
        self._key = _node_key(self.state)
        self._server, self._thread, self.url, self._registry = self._start_server()
        self.building: str | None = None
        self.build_errors: dict[str, str] = {}
        if self.config.templates:
            threading.Thread(target=self._build_all, name="node-builds", daemon=True).start()
        log.info(
            "node agent ready",
            extra={"fields": {"node": self.node_id, "url": self.url, "state_dir": str(self.state)}},
        )

    def _start_server(self) -> tuple[Any, threading.Thread, str, Any]:
        from ..server.admission import Limits
        from ..server.app import Settings
        from ..server.keys import KeyStore
        from ..server.serve import _Server, bind, build_app, configure_logging, uvicorn_config

        configure_logging("info")
        # the cluster server places by this node's slots (its novasandbox resource): the
        # node's own ceiling is those slots, not the single-host default (host memory)
        limits = Limits.default()
        limits = Limits(
            max_sandboxes=max(1, self._slots()),
            max_starting=limits.max_starting,
            max_requests=max(limits.max_requests, 4 * self._slots()),
        )
        app, registry = build_app(
            self.state,
            KeyStore(self.state),
            settings=Settings(max_file_bytes=self.config.max_file_bytes, limits=limits),
            pools=self.config.pools,
            prestart=self.config.prestart,
            provider=self.config.provider,
        )
        sock = bind(self.address, 0)
        port = sock.getsockname()[1]
        server = _Server(uvicorn_config(app), registry)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="node-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + START_WAIT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the node's server did not start on {self.address}:{port}")
            time.sleep(0.02)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return server, thread, f"http://{host}:{port}", registry

    def _slots(self) -> int:
        """This node's ``novasandbox`` Ray resource."""
        import ray

        for entry in ray.nodes():  # type: ignore[no-untyped-call]
            if entry.get("NodeID") == self.node_id:
                return int(entry.get("Resources", {}).get("novasandbox", 0) or 0)
        return 0

    # --- what the cluster server asks

    async def info(self) -> dict[str, Any]:
        """Where its server is and with which key, what it offers and which templates
        are ready there (with their default shapes)."""
        return await asyncio.to_thread(self._info)

    def _info(self) -> dict[str, Any]:
        from ..templates import TemplateManager
        from ..vm import get_provider

        manager = TemplateManager()
        needs_image = get_provider(self.config.provider).capabilities.needs_image
        templates: dict[str, dict[str, int]] = {}
        for tpl in manager.list():
            with contextlib.suppress(Exception):  # a damaged definition: not offered
                if not needs_image or manager.built(tpl) is not None:
                    templates[tpl.name] = {"vcpus": tpl.vcpus, "memory_mib": tpl.memory_mib}
        return {
            "node_id": self.node_id,
            "address": self.address,
            "url": self.url,
            "key": self._key,
            "pid": os.getpid(),
            "cpus": os.cpu_count() or 1,
            "memory_mib": _memory_mib(),
            "templates": templates,
            "draining": self.draining,
            "pools": dict(self._registry.pools.ready()),
            "building": self.building,
            "build_errors": dict(self.build_errors),
            "started_at": self.started_at,
            "state_dir": str(self.state),
        }

    async def set_draining(self, draining: bool) -> None:
        self.draining = bool(draining)

    async def snapshot_owners(self) -> dict[str, str]:
        """{snapshot id: the client key id it belongs to}, for the snapshots made
        through the cluster server on this node (kept in ``snapshot-owners.json`` in the
        node's state, next to the snapshots: a restarted server reads whose they are
        here, as it does for sandboxes from their owner label)."""
        with self._owners_lock:
            return self._read_owners()

    async def set_snapshot_owner(self, snapshot_id: str, owner: str | None) -> None:
        """Record (or, with None, forget) whose snapshot ``snapshot_id`` is."""
        with self._owners_lock:
            owners = self._read_owners()
            if owner is None:
                owners.pop(snapshot_id, None)
            else:
                owners[snapshot_id] = owner
            path = self.state / SNAPSHOT_OWNERS
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(owners, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _read_owners(self) -> dict[str, str]:
        try:
            data = json.loads((self.state / SNAPSHOT_OWNERS).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): str(v) for k, v in data.items()}

    async def build_template(self, name: str, definition: dict[str, Any] | None = None) -> float:
        """Build template ``name`` here (``definition``: its TOML table, saved first so
        the node builds the same template; None: a template the node defines already).
        Returns the seconds it took; a no-op when it is up to date."""
        return await asyncio.to_thread(self._build_template, name, definition)

    def _build_template(self, name: str, definition: dict[str, Any] | None) -> float:
        from .. import warmup
        from ..templates import TemplateManager

        t0 = time.monotonic()
        manager = TemplateManager()
        if definition is not None:
            tpl = manager.from_dict(definition, manager.definitions_dir / f"{name}.toml")
            if tpl.name != name:
                raise ValueError(f"the definition names {tpl.name!r}, not {name!r}")
            manager.save_definition(tpl)
        if not warmup.up_to_date(manager, name, self.config.provider):
            warmup.build(manager, name, provider=self.config.provider)
        return time.monotonic() - t0

    def _build_all(self) -> None:
        for name, definition in self.config.templates:
            self.building = name
            try:
                seconds = self._build_template(name, definition)
                log.info(
                    "template ready",
                    extra={"fields": {"template": name, "seconds": round(seconds, 1)}},
                )
            except Exception as exc:
                self.build_errors[name] = f"{type(exc).__name__}: {exc}"
                log.error("template build failed", extra={"fields": {"template": name}})
            finally:
                self.building = None

    async def wait_dead(self) -> None:
        """Never returns: the cluster server keeps one call of it pending, which Ray
        fails the moment this actor dies (how a node's death is heard at once)."""
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        """Kill this node's sandboxes and stop its server (the actor is killed after)."""
        self._server.should_exit = True
        await asyncio.to_thread(self._thread.join, 30)


def _memory_mib() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def remote_class() -> Any:
    """``NodeAgent`` as a Ray actor class (no CPU of its own: it waits on I/O)."""
    import ray

    decorate: Any = ray.remote
    return decorate(num_cpus=0, max_restarts=0, max_concurrency=64)(NodeAgent)


__all__ = [
    "KEY_NAME",
    "NAMESPACE",
    "OWNER_LABEL",
    "NodeAgent",
    "NodeConfig",
    "actor_name",
    "node_state_dir",
    "remote_class",
    "template_chain",
]


def template_chain(names: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
    """What nodes need to build ``names`` (``NodeConfig.templates``): each template and
    its parents, parents first, each once; a template defined by the package itself
    (every node has it) as None, any other as its pinned TOML table."""
    from ..templates import BUILTIN_DIR, TemplateManager

    manager = TemplateManager()
    chain: list[tuple[str, dict[str, Any] | None]] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        tpl = manager.get(name)
        if tpl.parent is not None:
            add(tpl.parent.name)
        if name in seen:
            return
        seen.add(name)
        builtin = tpl.source is not None and tpl.source.parent == BUILTIN_DIR
        chain.append((name, None if builtin else tpl.to_dict(pinned=True)))

    for name in names:
        add(name)
    return chain
