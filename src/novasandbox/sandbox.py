r"""Sandboxes: ``AsyncSandbox`` is the one implementation; ``Sandbox`` is its sync facade.

Lifecycle (an explicit state machine)::

    starting --> running <--> paused          (pause / resume)
        |         |  ^
        |         v  |
        |        broken                       (the agent broke the protocol; back to
        v                                      running when a new agent answers)
      error                                   (create failed: all released)

    running | paused | broken --> killed      (kill, or the end of its lifetime:
                             \                 ``expired``)
                              +-> crashed     (the VMM exited on its own)

``create`` resolves the template, validates the machine config, plans what the sandbox
holds on the host (``host.plan``), acquires it, starts the VM through the provider
(``vm``: the only way it reaches a VMM), connects to the guest agent and mounts the
extra drives. A failure at any step kills the VM and releases everything before the
error propagates; ``kill`` and ``gc`` release through the same path.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import logging
import math
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload

from .agent_client import AgentClient
from .code import (
    CodeInterpreter,
    CodeMethods,
)
from .commands import AsyncCommands
from .config import Drive, MachineConfig, validate_env, validate_lifetime
from .errors import (
    AgentError,
    AgentProtocolError,
    ConfigError,
    NovaSandboxError,
    ProviderError,
    SandboxCrashed,
    SandboxExpired,
    SandboxNotFound,
    SandboxNotRunning,
    SandboxOwned,
    ServerRequired,
    SnapshotError,
    TemplateBuildError,
    VMStartError,
    check_int,
)
from .files import AsyncFiles
from .guest.protocol import ErrorCode
from .host.plan import HostPlan, confinement, make_plan
from .host.resources import HostResources, free_loopback_ports
from .network import EgressRule, NetworkConfig, NetworkLog, NetworkMode, resolve
from .procfs import process_rss, process_start_time
from .records import (
    SandboxInfo,
    list_sandboxes,
    new_sandbox_id,
    read_record,
    release_abandoned,
    release_record,
    remove_state,
    sandboxes_dir,
    write_record,
)
from .remote import (
    DEFAULT_URL_EXPIRES,
    RemoteSandbox,
    RemoteSandboxInfo,
    RemoteSnapshot,
    delete_snapshot_on,
    list_snapshots_on,
    resolve_server,
)
from .results import SandboxMetrics, SandboxState
from .snapshots import (
    DISK,
    MANIFEST,
    MEMORY,
    BootPlan,
    Engine,
    Snapshot,
    delete_snapshot,
    drop_unused_fork_snapshot,
    drop_unused_fork_snapshots,
    get_snapshot,
    list_snapshots,
    new_snapshot_id,
    plan_boot,
    saved,
    snapshots_dir,
)
from .templates import (
    BuiltTemplate,
    Template,
    TemplateManager,
    image_format,
    name_backing_relative,
)
from .terminal import AsyncTerminals
from .vm import get_provider
from .vm.base import VM, Provider, VMPaths, VMSpec, drive_serial

log = logging.getLogger("novasandbox")

DEFAULT_BOOT_TIMEOUT = 120.0
DEFAULT_LIFETIME = 300.0
"""Seconds a sandbox lives unless ``timeout=`` or ``set_timeout`` says otherwise."""


# Sandboxes of this process, killed at interpreter exit if their owner forgot.
_LIVE: dict[str, tuple[int, Path]] = {}
_LIVE_LOCK = threading.Lock()
METRICS_TIMEOUT = 30.0
"""Seconds the guest agent has to answer ``get_metrics``."""
_MAX_METRIC = (1 << 63) - 1
_MAX_GUEST_CPUS = 4096


def guest_metrics(reply: Mapping[str, Any], vmm_rss: int | None) -> SandboxMetrics:
    """``SandboxMetrics`` from the agent's ``metrics`` reply (its types already checked
    against the protocol's schema) and the VMM's RSS; ``AgentProtocolError`` for values
    out of range (a guest that lies within them is not caught)."""
    pct = float(reply["cpu_used_pct"])
    sizes: list[int] = [reply[k] for k in ("mem_used", "mem_total", "disk_used", "disk_total")]
    if not (math.isfinite(pct) and 0.0 <= pct <= 100.0):
        bad = f"cpu_used_pct {pct!r} is not 0 to 100"
    elif not 1 <= reply["cpu_count"] <= _MAX_GUEST_CPUS:
        bad = f"cpu_count {reply['cpu_count']!r} is not 1 to {_MAX_GUEST_CPUS}"
    elif not all(0 <= n <= _MAX_METRIC for n in sizes):
        bad = "a size is negative or too large"
    elif sizes[0] > sizes[1] or sizes[2] > sizes[3]:
        bad = "more memory or disk used than there is"
    else:
        mem_used, mem_total, disk_used, disk_total = sizes
        return SandboxMetrics(
            pct, reply["cpu_count"], mem_used, mem_total, disk_used, disk_total, vmm_rss
        )
    raise AgentProtocolError(f"the guest agent sent metrics out of range: {bad}")


async def _egress_rules(net: NetworkConfig) -> tuple[EgressRule, ...] | None:
    """The resolved allow list of a networked sandbox (None: the public internet)."""
    if not net.enabled or net.allow == ():
        return ()
    if net.allow is None:
        return None
    return await asyncio.to_thread(resolve, net.entries())


@dataclass(frozen=True, slots=True)
class _SpareKey:
    """Which creates a VMM started ahead can serve: plain ones (no network, ports or
    drives) restoring this template snapshot with this provider, on this event loop
    (the VMM's control connection belongs to it)."""

    loop: int
    provider: str
    snapshot: str


@dataclass(slots=True)
class _SpareKind:
    template: str
    manager: TemplateManager
    provider: str | None
    wanted: int
    ready: list[AsyncSandbox] = field(default_factory=list)
    starting: bool = False
    """One is being started (they start one at a time)."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def fill(self) -> None:
        """Start VMMs in the background up to ``wanted``, one after the other (a start is
        mostly CPU: several at once would only slow the sandboxes that run)."""
        if not self.starting and len(self.ready) < self.wanted:
            self.starting = True
            self.spawn(self._start_one())

    def fill_later(self) -> None:
        """``fill`` after ``SPARE_REFILL_DELAY``: the sandbox just handed over (and the
        others of a burst of creates) first have the CPUs to themselves."""

        async def later() -> None:
            await asyncio.sleep(SPARE_REFILL_DELAY)
            self.fill()

        self.spawn(later())

    async def _start_one(self) -> None:
        try:
            sb = await AsyncSandbox._create_local(
                self.template, templates=self.manager, provider=self.provider, _prestart=True
            )
        except Exception as exc:  # the next create starts its own VMM; the next take retries
            log.warning("could not start a VMM ahead for %s: %s", self.template, exc)
            return
        finally:
            self.starting = False
        if self.wanted == 0 or len(self.ready) >= self.wanted:
            await sb._teardown(SandboxState.KILLED)
        else:
            self.ready.append(sb)
            self.fill()  # the next one

    async def stop(self) -> None:
        """Kill every VMM it started ahead, and those still starting once they are up."""
        self.wanted = 0
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        ready, self.ready = self.ready, []
        await asyncio.gather(*(sb._teardown(SandboxState.KILLED) for sb in ready))


SPARE_REFILL_DELAY = 0.5
"""Seconds after a create took a VMM started ahead before its replacement starts."""

_SPARES: dict[_SpareKey, _SpareKind] = {}
"""VMMs started ahead (``AsyncSandbox.prestart``), per kind of create they serve."""


def _take_spare(key: _SpareKey) -> AsyncSandbox | None:
    """A VMM started ahead for ``key``'s creates (a replacement starts shortly), or None."""
    kind = _SPARES.get(key)
    if kind is None:
        return None
    taken = None
    while kind.ready and taken is None:
        sb = kind.ready.pop(0)
        if sb._vm is not None and sb._vm.is_running():
            taken = sb
        else:
            log.warning("VMM %s started ahead ended while waiting: %s", sb.id, sb.console_tail())
            kind.spawn(sb._teardown(SandboxState.ERROR))
    kind.fill_later()
    return taken


async def _brought_up(
    sb: AsyncSandbox, work: Coroutine[object, object, None], sandbox_id: str
) -> AsyncSandbox:
    """``sb`` once ``work`` (its boot, or its restore) is done; on any failure everything
    it holds is released, and a failure below the library's own errors is a
    ``VMStartError`` with the console's tail."""
    try:
        await work
    except BaseException as exc:
        sb._state = SandboxState.ERROR
        tail = sb.console_tail()
        await sb._teardown(SandboxState.ERROR)
        # Our own typed errors (bad config, missing tool...) pass through as they are;
        # an agent that never answered and any lower-layer failure become VMStartError.
        # Cancellation and KeyboardInterrupt are not Exceptions and pass through.
        if isinstance(exc, VMStartError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, NovaSandboxError) and not isinstance(exc, AgentError):
            raise
        raise VMStartError(f"sandbox {sandbox_id} failed to start: {exc}", tail) from exc
    return sb


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE.items())
        _LIVE.clear()
    for sandbox_id, (pid, directory) in leftovers:
        log.warning("killing sandbox %s left running at exit", sandbox_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        info = read_record(directory)
        with contextlib.suppress(Exception):  # at exit: do what can be done
            if info is not None:
                release_record(info, directory)
        remove_state(directory)


class AsyncSandbox(CodeMethods):
    """A running microVM sandbox (asyncio). Create with ``await AsyncSandbox.create(...)``."""

    def __init__(
        self,
        *,
        sandbox_id: str,
        template: str,
        config: MachineConfig,
        paths: VMPaths,
        provider: Provider,
        engine: Engine,
        plan: HostPlan,
    ) -> None:
        self.id = sandbox_id
        self.template = template
        self.config = config
        self.paths = paths
        self._provider = provider
        self.engine = engine
        self.plan = plan
        """What it holds on the host, decided at create (and stored in its record)."""
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncTerminals(self)
        self._code = CodeInterpreter(self.commands)
        self._state = SandboxState.STARTING
        self._vm: VM | None = None
        self._held: HostResources | None = None
        self._agent: AgentClient | None = None
        self._started = time.monotonic()
        self._created_at = time.time()
        self.source_snapshot: Snapshot | None = None
        self._source_id: str | None = None
        """The id of what it was restored from (kept when adopted: the snapshot itself
        may be a template's, which is not listed by id)."""
        self._cold_reason: str | None = None
        self._stopping = False
        """Set once ``kill`` has begun: the VM's exit is then not a crash."""
        self.crash_reason: str | None = None
        """Why the VM ended on its own (state ``crashed``), e.g. "kernel panic: ..."."""
        self._deadline: float | None = None
        self._lifetime: float | None = None
        self._expired = False
        """Set when the lifetime ended: every later call raises ``SandboxExpired``."""
        self._released = False
        """Set once ``_teardown`` has released everything."""
        self._lifetime_timer: asyncio.TimerHandle | None = None
        self.timings: dict[str, float] = {}
        """Milliseconds from the start of the boot (or restore) to each step of it:
        ``vmm_started`` (with a VMM started ahead: the snapshot handed to it),
        ``agent_connected``, ``agent_answered``, ``ready``; ``guest_hello``, the guest
        time the agent spent on the hello (clock, RNG, network; part of
        ``agent_answered``); and ``shape_saved`` when its cold boot saved the snapshot
        of its machine shape."""
        self._op_lock = asyncio.Lock()
        """Serializes lifecycle operations (pause, resume, snapshot); kill does not wait on it."""
        self._reconnecting: asyncio.Task[None] | None = None
        self._adoptable = False
        """It outlives this process and may be adopted by another (``adopt``)."""
        self._spec: VMSpec | None = None
        """What its VMM was started with."""

    @property
    def provider(self) -> str:
        """The name of the provider (the VMM) that runs it (``novasandbox.vm``)."""
        return self._provider.name

    @property
    def node(self) -> str | None:
        """The cluster node it runs on: None here (a sandbox of this process); a
        ``RemoteSandbox`` of a cluster server (``serve --ray``) says its Ray node id."""
        return None

    @property
    def server(self) -> str | None:
        """The URL of the server that owns it: None, this process does
        (``RemoteSandbox.server`` is its server's)."""
        return None

    @property
    def labels(self) -> dict[str, str]:
        """What a server keeps with its sandboxes; a local one has none."""
        return {}

    async def refresh(self) -> None:
        """Nothing to do: a local sandbox's state is always current (a remote one asks
        its server)."""

    @property
    def accel(self) -> str:
        """How its guest code runs ("kvm", "tcg", or the provider's own word)."""
        return self.engine.accel

    # --- creation

    @overload
    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str,
    ) -> RemoteSandbox: ...
    @overload
    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: None = None,
    ) -> AsyncSandbox: ...
    @overload
    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str | None = None,
    ) -> AsyncSandbox | RemoteSandbox: ...

    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str | None = None,
    ) -> AsyncSandbox | RemoteSandbox:
        """Start a sandbox and wait until its agent answers.

        By default the template's snapshot is restored (fast); ``cold=True`` boots the
        kernel instead, and so do extra drives. Another machine shape (other vCPUs or
        memory) boots cold the first time and saves a snapshot of itself right after
        boot, before it is returned; later creates of that shape restore it
        (``sandbox.restored``; ``sandbox.cold_reason`` says why one booted cold).
        ``from_snapshot`` restores a snapshot made by ``sandbox.snapshot()`` (or its id):
        files and running processes included.

        ``timeout`` is the sandbox's lifetime in seconds (None: no limit): when it ends
        the VM is killed and its state removed, by this process's timer, by the guest
        agent powering the VM off if this process is gone, and by the next ``gc``.

        ``network="nat"`` gives the guest a network device behind the VMM's user-mode NAT,
        ``"tap"`` (root) one on a TAP of the host (see ``novasandbox.network``): ``allow``
        is its egress allow list (None: the public internet; ``[]``: nothing), ``ports``
        the guest TCP ports reachable from the host (``sandbox.get_host(port)``). The
        default ``"none"`` has no network device. ``NetworkMode.NAT`` etc. are the same
        values as an enum.

        ``provider`` names the VMM that runs it (``novasandbox.vm``); None: the one
        ``NOVASANDBOX_PROVIDER`` names, else the registry's default.

        ``adoptable=True``: the sandbox outlives this process (it is not killed at exit,
        nor reaped for its owner being gone, until its lifetime ends) and another process
        can take it over with ``AsyncSandbox.adopt(id)``.

        ``server`` (a URL; else ``NOVASANDBOX_SERVER``) creates it on a ``novasandbox
        serve`` with ``api_key`` (else ``NOVASANDBOX_API_KEY``) and returns a
        ``RemoteSandbox`` (``novasandbox.remote``): the same methods, results and errors.
        ``labels`` are kept by the server (``list(labels=...)`` filters on them);
        ``from_snapshot`` is one of the key's snapshots there (a ``RemoteSnapshot`` or its
        id). The arguments about this host (``drives``, ``boot_timeout``, ``templates``,
        ``provider``, ``adoptable``) are for local sandboxes only.
        """
        return await cls._open(
            template,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            drives=drives,
            cold=cold,
            from_snapshot=from_snapshot,
            timeout=timeout,
            boot_timeout=boot_timeout,
            templates=templates,
            network=network,
            allow=allow,
            ports=ports,
            provider=provider,
            adoptable=adoptable,
            labels=labels,
            api_key=api_key,
            server=server,
        )

    @classmethod
    async def _open(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | RemoteSnapshot | str | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        labels: Mapping[str, str] | None = None,
        api_key: str | None = None,
        server: str | None = None,
    ) -> AsyncSandbox | RemoteSandbox:
        """``create`` for a caller that does not know which kind it gets (``sync``)."""
        where = resolve_server(server, api_key)
        if where is None:
            if labels:
                raise ConfigError("labels are kept by a server: give server= to use them")
            if isinstance(from_snapshot, RemoteSnapshot):
                raise ConfigError(
                    f"snapshot {from_snapshot.id} is kept by the server {from_snapshot.server}:"
                    " give server= to restore it there"
                )
            if isinstance(from_snapshot, str):
                from_snapshot = get_snapshot(from_snapshot)
            return await cls._create_local(
                template,
                vcpus=vcpus,
                memory_mib=memory_mib,
                env=env,
                drives=drives,
                cold=cold,
                from_snapshot=from_snapshot,
                timeout=timeout,
                boot_timeout=boot_timeout,
                templates=templates,
                network=network,
                allow=allow,
                ports=ports,
                provider=provider,
                adoptable=adoptable,
            )
        local_only = {
            "drives": bool(drives),
            "boot_timeout": boot_timeout != DEFAULT_BOOT_TIMEOUT,
            "templates": templates is not None,
            "provider": provider is not None,
            "adoptable": adoptable is not False,
        }
        for name, given in local_only.items():
            if given:
                raise ConfigError(f"{name}= is for local sandboxes, not through a server")
        return await RemoteSandbox.create(
            template,
            server=where,
            vcpus=vcpus,
            memory_mib=memory_mib,
            env=env,
            cold=cold,
            timeout=timeout,
            network=network,
            allow=allow,
            ports=ports,
            labels=labels,
            from_snapshot=from_snapshot,
        )

    @classmethod
    async def connect(
        cls, sandbox_id: str, *, server: str | None = None, api_key: str | None = None
    ) -> RemoteSandbox:
        """Reattach to the sandbox ``sandbox_id`` on a server (``server``/``api_key``,
        else ``NOVASANDBOX_SERVER``/``NOVASANDBOX_API_KEY``), from any process: the key's
        sandboxes only. Local sandboxes are taken over with ``adopt``."""
        where = resolve_server(server, api_key)
        if where is None:
            raise ConfigError(
                "connect needs a server (server= or NOVASANDBOX_SERVER); a local sandbox "
                "made with adoptable=True is taken over with adopt(id)"
            )
        return await RemoteSandbox.connect(sandbox_id, server=where)

    @classmethod
    async def _create_local(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        cold: bool = False,
        from_snapshot: Snapshot | None = None,
        timeout: float | None = DEFAULT_LIFETIME,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
        network: NetworkMode | str = NetworkMode.NONE,
        allow: Sequence[str] | None = None,
        ports: Sequence[int] = (),
        provider: str | None = None,
        adoptable: bool = False,
        _prestart: bool = False,
        _image: BuiltTemplate | None = None,
    ) -> AsyncSandbox:
        """``create`` on this host (whatever ``NOVASANDBOX_SERVER`` says): the
        library's own callers (pools, forks, warm-up, the server). With ``_prestart``,
        a VMM started ahead (``prestart``), waiting for its snapshot and not yet a
        sandbox anyone has; a plain create takes one when there is one for it. With
        ``_image``, a cold boot of that image (a template build's step VM)."""
        lifetime = validate_lifetime(timeout)
        net = NetworkConfig(network, None if allow is None else tuple(allow), tuple(ports))
        vmm = get_provider(provider)
        caps = vmm.capabilities
        if not isinstance(adoptable, bool):
            raise ConfigError(f"adoptable must be True or False, got {adoptable!r}")
        if adoptable and not caps.adoptable:
            raise ConfigError(f"the {vmm.name} provider's sandboxes cannot be adopted")
        if net.mode not in caps.networks:
            raise ConfigError(f"the {vmm.name} provider cannot attach network={net.mode!r}")
        if drives and not caps.drives:
            raise ConfigError(f"the {vmm.name} provider cannot attach drives")
        # what crashed owners and expired lifetimes left; the VMM uids of those left
        released, kept = await asyncio.to_thread(release_abandoned)
        if released:
            await asyncio.to_thread(drop_unused_fork_snapshots)
        taken_uids = {i.vmm_uid for i in kept if i.vmm_uid is not None}
        engine = vmm.engine()
        manager = templates or TemplateManager()
        env_map = validate_env(env)
        snap = from_snapshot
        built: BuiltTemplate | None = None
        if snap is not None:
            if not isinstance(snap, Snapshot):
                raise ConfigError("from_snapshot must be a Snapshot")
            if not caps.snapshots:
                raise ConfigError(f"the {vmm.name} provider cannot restore snapshots")
            if (vcpus not in (None, snap.vcpus)) or (memory_mib not in (None, snap.memory_mib)):
                raise ConfigError("a snapshot restores with its own vcpus and memory_mib")
            if drives:
                raise ConfigError("drives cannot be attached to a restored snapshot")
            snap.check_network(net.mode)
            snap.check_compatible(engine)
            template = snap.template
            config = MachineConfig(
                vcpus=snap.vcpus,
                memory_mib=snap.memory_mib,
                env={**snap.env, **env_map},
                network=net,
            )
            kernel: Path | None = snap.kernel
            boot = BootPlan(snap)
        else:
            tpl = manager.get(template) if _image is None else _image.template
            if _image is not None:
                built = _image
            elif caps.needs_image:
                built = manager.require_built(template)
            config = MachineConfig(
                vcpus=tpl.vcpus if vcpus is None else vcpus,
                memory_mib=tpl.memory_mib if memory_mib is None else memory_mib,
                drives=tuple(drives),
                env=env_map,
                network=net,
            )
            kernel = built.kernel if built is not None else None
            if _image is not None:
                boot = BootPlan(None, "a template build step")
            elif built is not None:
                restorer = engine if caps.snapshots else None
                boot = plan_boot(manager, built, config, restorer, cold=cold)
            else:
                boot = BootPlan(None, f"the {vmm.name} provider boots no image")
            snap = boot.snapshot
        rootfs: Path | None
        if snap is not None:
            rootfs, disk_format, incoming = snap.disk, "qcow2", snap.memory
        else:
            rootfs, incoming = (built.rootfs if built else None), None
            disk_format = image_format(rootfs) if rootfs is not None else "raw"
        spare_key = None
        if (
            caps.prestart
            and snap is not None
            and snap.kind == "template"
            and from_snapshot is None
            and net.mode == "none"
            and not drives
            and boot.save_shape is None
        ):
            spare_key = _SpareKey(id(asyncio.get_running_loop()), vmm.name, str(snap.directory))
        if _prestart and spare_key is None:
            raise ConfigError(
                f"template {template!r} has no snapshot to restore with the {vmm.name} "
                "provider: there is no VMM to start ahead for it"
            )
        if not _prestart and spare_key is not None:
            spare = _take_spare(spare_key)
            if spare is not None:
                spare.config = replace(spare.config, env=config.env)
                spare._adoptable = adoptable
                try:
                    return await _brought_up(spare, spare._claim(boot_timeout, lifetime), spare.id)
                except VMStartError as exc:  # it died waiting, say: released; start one
                    log.warning("the VMM started ahead as %s failed: %s", spare.id, exc)
        sandbox_id = new_sandbox_id()
        plan = make_plan(
            sandbox_id,
            net,
            config.vcpus,
            config.memory_mib,
            confine=confinement(sandbox_id, taken_uids) if caps.isolated else None,
            free_ports=free_loopback_ports(len(net.ports)) if net.mode == "nat" else (),
            cgroups=caps.isolated,
        )
        egress_rules = await _egress_rules(net)
        directory = sandboxes_dir() / sandbox_id
        directory.mkdir(parents=True, mode=0o700)
        sb = cls(
            sandbox_id=sandbox_id,
            template=template,
            config=config,
            paths=VMPaths(directory),
            provider=vmm,
            engine=engine,
            plan=plan,
        )
        sb.source_snapshot = snap
        sb._source_id = snap.id if snap is not None else None
        sb._cold_reason = boot.cold_reason
        sb._adoptable = adoptable
        log.info(
            "creating sandbox %s from %s by %s (%s %s: %s)",
            sandbox_id,
            snap.id if snap else template,
            "restore" if snap else f"cold boot ({boot.cold_reason})",
            vmm.name,
            engine.accel,
            vmm.accel_reason(),
        )
        spec = VMSpec(
            sandbox_id,
            config,
            kernel,
            rootfs,
            sb.paths,
            engine.accel,
            plan,
            rootfs_format=disk_format,
            incoming=incoming,
            defer_incoming=_prestart,
        )
        if _prestart:
            return await _brought_up(sb, sb._start_vmm(spec, egress_rules), sandbox_id)

        # a cold boot of a template starts its start command as its snapshot holds it
        starts = built.template if snap is None and built is not None and _image is None else None

        async def boot_and_save() -> None:
            await sb._boot(spec, egress_rules, boot_timeout, lifetime)
            if starts is not None:
                await sb._start_template_command(starts)
            if boot.save_shape is not None and built is not None:
                await sb._save_shape(manager, built, boot.save_shape)

        return await _brought_up(sb, boot_and_save(), sandbox_id)

    async def _claim(self, boot_timeout: float, lifetime: float | None) -> None:
        """Make this VMM started ahead the sandbox a create asked for: restore into it."""
        spec = self._spec
        assert spec is not None and spec.defer_incoming
        if self._adoptable:
            with _LIVE_LOCK:
                _LIVE.pop(self.id, None)
        self._created_at = time.time()
        t0 = time.monotonic()
        self._arm_lifetime(lifetime)
        self._record()
        await self._bring_up(spec, t0, t0 + boot_timeout)

    @classmethod
    async def prestart(
        cls,
        template: str = "python",
        count: int = 1,
        *,
        templates: TemplateManager | None = None,
        provider: str | None = None,
    ) -> int:
        """Keep ``count`` VMMs of ``template`` started ahead in this process, waiting for
        its snapshot: a plain ``create(template)`` (no network, ports or drives; env and
        timeout as wanted) restores into one instead of starting a VMM, which saves the
        VMM's start (about 40 ms under TCG), and another is started in the background.
        Returns how many wait once the new ones are started; ``count=0`` stops them.
        Each is an idle VMM (about 20 MiB, no guest running), listed as a ``starting``
        sandbox, and killed when this process exits. For this event loop only (the sync
        API's own, for ``Sandbox.prestart``). Providers without
        ``Capabilities.prestart`` raise ``ConfigError``."""
        check_int("prestart count", count, 0, 64)
        loop = id(asyncio.get_running_loop())
        vmm = get_provider(provider)
        kinds = [
            (key, kind)
            for key, kind in list(_SPARES.items())  # other threads' loops may add theirs
            if key.loop == loop and key.provider == vmm.name and kind.template == template
        ]
        if count == 0:
            for key, kind in kinds:
                del _SPARES[key]
                await kind.stop()
            return 0
        if not vmm.capabilities.prestart:
            raise ConfigError(f"the {vmm.name} provider cannot start VMMs ahead")
        if kinds:
            key, kind = kinds[0]
        else:
            first = await cls._create_local(
                template, templates=templates, provider=provider, _prestart=True
            )
            assert first.source_snapshot is not None
            key = _SpareKey(loop, vmm.name, str(first.source_snapshot.directory))
            kind = _SpareKind(template, templates or TemplateManager(), provider, count)
            kind.ready.append(first)
            _SPARES[key] = kind
        kind.wanted = count
        while len(kind.ready) > count:
            await kind.ready.pop()._teardown(SandboxState.KILLED)
        kind.fill()
        while kind.tasks:  # a delayed refill starts more on its way
            await asyncio.gather(*list(kind.tasks), return_exceptions=True)
        return len(kind.ready)

    @classmethod
    async def adopt(cls, sandbox_id: str, *, timeout: float = 30.0) -> AsyncSandbox:
        """Take over a running sandbox that was created ``adoptable=True`` by a process
        that is gone (a server that restarted, a script that crashed): reconnect to its
        VM and agent, and own it from now on (its lifetime, its ``kill``). Raises
        ``SandboxNotFound`` for an unknown id or one whose VM is gone (what it left is
        released), ``SandboxOwned`` while its owner lives or if it is not adoptable.

        What changes: a networked sandbox's refusals are counted but no longer listed
        entry by entry; one whose egress was enforced by the seccomp guard of its old
        owner (no root) has lost its network (it fails closed)."""
        directory = sandboxes_dir() / sandbox_id
        info = read_record(directory) if sandbox_id and "/" not in sandbox_id else None
        if info is None:
            raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
        if not info.adoptable or info.config is None:
            raise SandboxOwned(f"sandbox {sandbox_id} was not created adoptable")
        if info.owner_alive:
            raise SandboxOwned(
                f"sandbox {sandbox_id} is owned by process {info.owner_pid}, which still runs"
            )
        if not info.alive or info.pid is None or info.pid_start_time is None or info.expired:
            await asyncio.to_thread(release_record, info, directory)
            raise SandboxNotFound(f"sandbox {sandbox_id}'s VM is gone (or its lifetime ended)")
        vmm = get_provider(info.provider)
        plan = info.host_plan
        config = MachineConfig.from_json(info.config)
        sb = cls(
            sandbox_id=sandbox_id,
            template=info.template,
            config=config,
            paths=VMPaths(directory),
            provider=vmm,
            engine=Engine(info.accel, ""),
            plan=plan,
        )
        sb._created_at = info.created_at
        sb._cold_reason = info.cold_reason
        sb._adoptable = True
        sb._source_id = info.source_snapshot
        if info.source_snapshot is not None:
            with contextlib.suppress(NovaSandboxError):  # a user's or a fork's snapshot
                sb.source_snapshot = get_snapshot(info.source_snapshot)
        spec = VMSpec(sandbox_id, config, None, None, sb.paths, info.accel, plan)
        deadline = time.monotonic() + timeout
        try:
            sb._held = HostResources.adopt(plan, info.tap, sb.paths.network_log)
            sb._vm = await vmm.adopt(spec, info.pid, info.pid_start_time)
            remaining = None if info.deadline is None else info.deadline - time.time()
            sb._arm_lifetime(None if remaining is None else max(0.001, remaining))
            sb._deadline = info.deadline  # the same instant, not one recomputed from now
            sb._agent = await AgentClient.over(
                *await sb._vm.open_channel(deadline),
                deadline=deadline,
                alive=sb._vm.is_running,
                hello=sb._hello(),
                on_close=sb._agent_closed,
            )
        except BaseException:
            # the VM stays as it was, for another try; only this process's side goes
            if sb._lifetime_timer is not None:
                sb._lifetime_timer.cancel()
            if sb._agent is not None:
                sb._agent.abort(SandboxNotRunning(f"sandbox {sandbox_id} was not adopted"))
            raise
        sb._state = SandboxState.RUNNING
        sb._started = time.monotonic()
        sb._record()
        log.info("sandbox %s adopted (VMM pid %d)", sandbox_id, info.pid)
        return sb

    def get_host(self, port: int) -> str:
        """``"ADDRESS:PORT"`` where the host reaches guest TCP ``port``: a forwarded port
        of 127.0.0.1 ("nat") or the guest's own address ("tap"). The port must have been
        exposed with ``create(..., ports=[port])``."""
        if port not in self.config.network.ports:
            raise ConfigError(
                f"guest port {port!r} is not exposed; exposed: "
                f"{sorted(self.config.network.ports)} (create(..., ports=[...]))"
            )
        held = self._held
        if self._vm is None or held is None or held.guest is None:
            raise SandboxNotRunning(f"sandbox {self.id} is not running")
        return held.host_address(port)

    @property
    def restored(self) -> bool:
        """Whether this sandbox was restored from a snapshot (rather than booted cold)."""
        return self._source_id is not None

    @property
    def cold_reason(self) -> str | None:
        """Why it booted cold instead of restoring a snapshot (None when restored)."""
        return self._cold_reason

    async def _save_shape(self, manager: TemplateManager, built: BuiltTemplate, dest: Path) -> None:
        """Save the just-booted guest (nothing run in it yet) as the snapshot of its
        machine shape at ``dest``, before anyone used it; the VM goes on running. What
        the host told it at boot (hostname, clock, lifetime, network settings) is told
        again to every sandbox restored from it, and its RNG is reseeded then, as for any
        snapshot; no environment is saved.

        Written under a temporary name and renamed into place, so a half-written
        snapshot is never used; when another process saved the same shape first, that
        one stays. A failure is logged and the sandbox goes on (unless its VM is gone)."""
        vm, agent = self._vm, self._agent
        assert vm is not None and agent is not None
        t0 = time.monotonic()
        if dest.exists():
            return
        dest.parent.mkdir(exist_ok=True)  # not its parents: a removed template stays removed
        partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
        try:
            took, frozen = await self._capture(partial, resume=True, drop_caches=False)
            snap = saved(
                snapshot_id=f"shape-{built.name}-{dest.name}",
                kind="template",
                template=built.name,
                directory=dest,
                files=partial,
                kernel=built.kernel,
                backing=built.rootfs,
                config=self.config,
                engine=self.engine,
                took=took,
                network=self.config.network.mode,
                frozen=frozen,
            )
            name_backing_relative(partial / DISK, built.rootfs, dest)
            (partial / MANIFEST).write_text(snap.manifest_text())
            try:
                partial.rename(dest)
            except OSError:
                if not dest.is_dir():
                    raise
                log.debug("the snapshot of %s was saved by another process first", dest)
                shutil.rmtree(partial, ignore_errors=True)
                return
            with contextlib.suppress(OSError):
                os.utime(dest)  # the most recently used
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            log.warning(
                "sandbox %s: could not save the snapshot of its machine shape (it boots "
                "cold again next time): %s",
                self.id,
                exc,
            )
            if not vm.is_running():
                raise
            with contextlib.suppress(NovaSandboxError):  # a ping thaws a frozen root
                await agent.call("ping", timeout=10)
            return
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        for gone in manager.evict_shape_snapshots(built.template, keep=dest):
            log.info("evicted the least recently used shape snapshot %s", gone.name)
        took_ms = (time.monotonic() - t0) * 1000
        self.timings["shape_saved"] = self.timings.get("ready", 0.0) + took_ms
        log.info(
            "sandbox %s: saved the snapshot of its machine shape in %.0f ms (%.0f MB); "
            "later creates of it restore",
            self.id,
            took_ms,
            snap.size_bytes / 1e6,
        )

    async def _start_template_command(self, tpl: Template) -> None:
        """Start the template's ``start_cmd`` in the background (as its user, in its
        working directory, tagged ``start_cmd``, no timeout) and wait until its
        ``ready_cmd`` exits 0, trying at most every 0.5 s for ``ready_timeout`` seconds.
        ``TemplateBuildError`` with the start command's output if it exits first or
        never becomes ready (it is killed then)."""
        if tpl.start_cmd is None:
            return
        handle = await self.commands.run(
            tpl.start_cmd, background=True, timeout=None, tag="start_cmd", max_output=64 << 10
        )
        deadline = time.monotonic() + tpl.ready_timeout
        last = ""
        try:
            while tpl.ready_cmd is not None:
                if handle.done():
                    result = await handle.wait()
                    output = (result.stdout + result.stderr)[-4000:]
                    raise TemplateBuildError(
                        f"template {tpl.name}: start_cmd exited ({result.exit_code}) before "
                        f"ready_cmd succeeded:\n{output}",
                        step="start_cmd",
                        exit_code=result.exit_code,
                        output=output,
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TemplateBuildError(
                        f"template {tpl.name}: ready_cmd did not succeed within "
                        f"{tpl.ready_timeout:g} s of start_cmd; its last output:\n{last}",
                        step="ready_cmd",
                        output=last,
                    )
                check = await self.commands.run(tpl.ready_cmd, timeout=max(1.0, min(left, 30)))
                if check.exit_code == 0:
                    break
                last = (check.stdout + check.stderr)[-2000:]
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        except BaseException:
            with contextlib.suppress(Exception):
                await handle.kill()
            raise
        handle.disconnect()

    async def _capture(
        self,
        directory: Path,
        *,
        resume: bool,
        drop_caches: bool = True,
        quiesce_timeout: float = 30,
    ) -> tuple[float, bool]:
        """Save the VM into ``directory`` (memory.bin + disk.qcow2); returns the seconds it
        took and whether the guest's root file system was left frozen in it. The guest
        flushes its file systems first (optionally dropping clean caches, for a smaller
        memory image). The running VM's memory is saved live, which ends with the VM
        paused and its disks flushed; the disk is copied then, so memory and disk are of
        the same instant and nothing needs freezing (a restore then has no thaw to do).
        An agent older than the ``sync`` request is frozen instead, as it was then. With
        ``resume`` the VM continues afterwards (thawed if frozen). On failure the
        partial files are removed."""
        vm, agent = self._vm, self._agent
        if vm is None or agent is None:
            raise SnapshotError(f"sandbox {self.id} is not running")
        if not self._provider.capabilities.snapshots:
            raise SnapshotError(f"the {self._provider.name} provider cannot save snapshots")
        directory.mkdir(parents=True, exist_ok=False)
        frozen = False
        try:
            await agent.call("sync", drop_caches=drop_caches, timeout=quiesce_timeout)
        except AgentProtocolError as exc:
            if exc.agent_code != ErrorCode.UNKNOWN_OP:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            await agent.call("freeze", drop_caches=drop_caches, timeout=quiesce_timeout)
            frozen = True
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        t0 = time.monotonic()
        try:
            await vm.save(directory / MEMORY, directory / DISK)
            (directory / DISK).chmod(0o444)
            (directory / MEMORY).chmod(0o444)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            took = time.monotonic() - t0
            if resume and vm.is_running():
                with contextlib.suppress(Exception):
                    await vm.resume()
                if frozen:
                    with contextlib.suppress(Exception):
                        await agent.call("thaw", timeout=quiesce_timeout)
        return took, frozen

    async def _boot(
        self,
        spec: VMSpec,
        egress_rules: tuple[EgressRule, ...] | None,
        boot_timeout: float,
        lifetime: float | None,
    ) -> None:
        t0 = time.monotonic()
        self._arm_lifetime(lifetime)
        await self._start_vmm(spec, egress_rules)
        await self._bring_up(spec, t0, t0 + boot_timeout)

    async def _start_vmm(self, spec: VMSpec, egress_rules: tuple[EgressRule, ...] | None) -> None:
        """Acquire what the plan says and start the VMM (waiting for its snapshot when
        ``spec.defer_incoming``)."""
        self._spec = spec
        self._record()
        self._held = HostResources.acquire(self.plan, egress_rules, self.paths.network_log)
        if self._held.refusals is not None:
            self._held.refusals.on_change = self._record
        self._vm = await self._provider.start(spec, self._held)
        with _LIVE_LOCK:
            if not self._adoptable:
                _LIVE[self.id] = (self._vm.pid, self.paths.state_dir)
        self._record()

    async def _bring_up(self, spec: VMSpec, t0: float, deadline: float) -> None:
        """From a started VMM to a sandbox whose agent answered: the restore (given to a
        VMM that waits for it), the hello, the drives."""
        vm = self._vm
        assert vm is not None
        if spec.defer_incoming:
            assert spec.incoming is not None
            try:
                await vm.load(spec.incoming, deadline)
            except ProviderError as exc:  # e.g. it ended while it waited
                raise VMStartError(f"the VMM could not take the snapshot: {exc}") from exc
        hello = self._hello()
        t_vmm = time.monotonic()
        if spec.incoming is not None:
            # The restored guest resumes where the snapshot left it: a stale clock, the
            # RNG state every other clone has too (and a frozen root file system, in a
            # snapshot saved by an older version).
            snap = self.source_snapshot
            if snap is None or not snap.autostart:
                await vm.wait_restored(deadline)
                await vm.resume()
            hello.update(entropy=secrets.token_hex(64), time_ns=time.time_ns())
            if snap is None or snap.frozen:
                hello["thaw"] = True
            log.debug("%s: VMM started in %.1f ms", self.id, (t_vmm - t0) * 1000)
        self._agent = await AgentClient.over(
            *await vm.open_channel(deadline),
            deadline=deadline,
            alive=vm.is_running,
            hello=hello,
            on_close=self._agent_closed,
        )
        t_answered = time.monotonic()
        for index, drive in enumerate(self.config.drives, start=1):
            await self._agent.call(
                "mount",
                serial=drive_serial(index),
                path=drive.mount,
                read_only=drive.read_only,
                fstype=drive.fstype,
            )
        self._state = SandboxState.RUNNING
        self._started = time.monotonic()
        self.timings = {
            "vmm_started": (t_vmm - t0) * 1000,
            "agent_connected": (self._agent.connected_at - t0) * 1000,
            "agent_answered": (t_answered - t0) * 1000,
            "ready": (self._started - t0) * 1000,
        }
        hello_us = self._agent.info.get("hello_us")
        if type(hello_us) is int and 0 <= hello_us < 10**9:  # the guest says it: bounded
            # what the agent spent on the hello itself (clock, RNG, network), guest time
            self.timings["guest_hello"] = hello_us / 1000
        self._record()
        log.info(
            "sandbox %s ready in %.0f ms (%s, guest kernel %s)",
            self.id,
            (time.monotonic() - t0) * 1000,
            ("restored into a VMM started ahead" if spec.defer_incoming else "restored")
            if spec.incoming
            else "cold boot",
            self._agent.info.get("kernel"),
        )

    def _hello(self) -> dict[str, object]:
        """What the agent is told when the host connects."""
        hello: dict[str, object] = {
            "time_ns": time.time_ns(),
            "hostname": self.id,
            "lifetime_s": self._remaining_lifetime(),
        }
        if self._held is not None and self._held.guest is not None:
            hello["net"] = self._held.guest.hello()
        return hello

    # --- a broken agent channel

    def _agent_closed(self, reason: NovaSandboxError) -> None:
        """The agent channel ended by itself (called from its reader). A protocol break
        with the VM still running makes the sandbox ``broken`` until a new agent answers."""
        if self._stopping or self._state is not SandboxState.RUNNING:
            return
        if not isinstance(reason, AgentProtocolError):
            return  # the VMM went away: ``state`` tells the crash
        self._state = SandboxState.BROKEN
        self.crash_reason = reason.message
        log.warning("sandbox %s is broken: %s", self.id, reason.message)
        self._record()
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Offer the guest a fresh channel, with growing pauses, until an agent completes
        the handshake (init restarts the agent when it dies) or the sandbox ends."""
        pause = 0.1
        while self._state is SandboxState.BROKEN and not self._stopping:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
            vm = self._vm
            if vm is None or not vm.is_running():
                return
            try:
                deadline = time.monotonic() + 3.0
                agent = await AgentClient.over(
                    *await vm.open_channel(deadline),
                    deadline=deadline,
                    alive=vm.is_running,
                    hello=self._hello(),
                    on_close=self._agent_closed,
                )
            except NovaSandboxError as exc:
                log.debug("%s: no agent yet: %s", self.id, exc)
                continue
            if self._stopping or self._state is not SandboxState.BROKEN:
                agent.abort(SandboxNotRunning(f"sandbox {self.id} is {self._state.value}"))
                return
            self._agent = agent
            self._state = SandboxState.RUNNING
            self.crash_reason = None
            self._record()
            log.warning("sandbox %s: agent channel back (agent pid %s)", self.id, agent.info["pid"])

    def _record(self) -> None:
        vm = self._vm
        write_record(
            self.paths.state_dir,
            SandboxInfo(
                id=self.id,
                template=self.template,
                state=self._state.value,
                pid=vm.pid if vm else None,
                pid_start_time=vm.start_time if vm else None,
                owner_pid=os.getpid(),
                created_at=self._created_at,
                vcpus=self.config.vcpus,
                memory_mib=self.config.memory_mib,
                accel=self.accel,
                state_dir=str(self.paths.state_dir),
                source_snapshot=self._source_id,
                cold_reason=self._cold_reason,
                owner_start_time=process_start_time(os.getpid()),
                deadline=self._deadline,
                plan=self.plan.to_json(),
                provider=self._provider.name,
                config=self.config.to_json(),
                adoptable=self._adoptable,
                tap=self._held.tap_name if self._held else None,
                refused=self._refusals().refused,
            ),
        )

    def _refusals(self) -> NetworkLog:
        held = self._held
        if held is None or held.refusals is None:
            return NetworkLog(0, ())
        return held.refusals.snapshot()

    async def network_log(self) -> NetworkLog:
        """What the egress policy has refused so far: ``refused`` counts every refused
        connection (a TCP connection or a UDP datagram), ``entries`` lists the most recent
        ones logged (destination, port, protocol, and the rule that refused each). Each
        is also logged on the host (logger ``novasandbox.network``, WARNING). Empty for a
        sandbox without a network."""
        held = self._held
        if held is None or held.refusals is None:
            return NetworkLog(0, ())
        return await held.refusals.refresh()

    async def get_metrics(self) -> SandboxMetrics:
        """Its resource use now: the guest's CPU, memory and root disk (from its agent) and
        the VMM's resident memory on the host (``SandboxMetrics``). Waits up to 0.1 s for
        a CPU sample unless the previous call was 0.1 to 10 s ago."""
        agent = self._require_agent()
        reply = await agent.call("metrics", timeout=METRICS_TIMEOUT)
        vm = self._vm
        return guest_metrics(reply, process_rss(vm.pid) if vm is not None else None)

    # --- state

    @property
    def state(self) -> SandboxState:
        if (
            self._state in (SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.BROKEN)
            and not self._stopping
            and self._vm is not None
            and not self._vm.is_running()
        ):
            if self._lifetime_over():
                # The guest's watchdog (or gc) ended it a moment before our timer fired;
                # the timer's kill releases what is left.
                self._expired = True
                self._state = SandboxState.KILLED
                return self._state
            self._state = SandboxState.CRASHED
            self.crash_reason = self._diagnose_exit(self._vm)
            log.warning("sandbox %s crashed: %s", self.id, self.crash_reason)
            self._record()
        return self._state

    def _diagnose_exit(self, vm: VM) -> str:
        """Why the VM ended without being asked to: from the guest's console (a kernel
        panic, the end of its lifetime), the VMM (its exit status) and the host (its
        control group's OOM killer)."""
        tail = self.console_tail(100)
        for line in reversed(tail.splitlines()):
            if "Kernel panic - not syncing:" in line:
                return "kernel panic: " + line.split("not syncing:", 1)[1].strip()
        if self._held is not None and self._held.oom_killed():
            return (
                f"{vm.exit_reason()}: the host kernel's OOM killer, for going over its "
                "control group's memory limit"
            )
        if "lifetime is over" in tail:
            return "the guest powered off at the end of its lifetime"
        return vm.exit_reason()

    def is_running(self) -> bool:
        return self.state is SandboxState.RUNNING

    @property
    def uptime(self) -> float:
        """Seconds since the sandbox became ready (0 before)."""
        if self._state is SandboxState.STARTING:
            return 0.0
        return time.monotonic() - self._started

    @property
    def guest_kernel(self) -> str:
        return str(self._agent.info.get("kernel", "")) if self._agent else ""

    def console_tail(self, lines: int = 40) -> str:
        """The last lines the guest printed on its serial console."""
        try:
            text = self.paths.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _raise_if_crashed(self, grace: float = 2.0) -> None:
        """After the agent channel broke: if the VM is ending, raise ``SandboxCrashed``
        (the channel closes a moment before the VMM's exit is visible)."""
        deadline = time.monotonic() + grace
        while self.state is SandboxState.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.state is SandboxState.CRASHED:
            self._require_agent()

    def _require_agent(self) -> AgentClient:
        state = self.state
        if self._expired:
            raise self._expired_error()
        if state is SandboxState.CRASHED:
            raise SandboxCrashed(
                f"sandbox {self.id} crashed: {self.crash_reason}",
                self.crash_reason or "",
                self.console_tail(),
            )
        if state is SandboxState.BROKEN:
            raise AgentProtocolError(
                f"sandbox {self.id} is broken: {self.crash_reason} (it recovers if the "
                "guest starts a new agent)"
            )
        if state is not SandboxState.RUNNING or self._agent is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {state.value}")
        return self._agent

    # --- pause, snapshot, fork

    def _settle(self, state: SandboxState) -> None:
        """The state a lifecycle operation ends in, unless a kill began meanwhile (kill
        does not wait for operations: it makes them fail)."""
        if not self._stopping:
            self._state = state
            self._record()

    async def pause(self) -> None:
        """Stop the guest's CPUs; it keeps its memory, processes and files."""
        async with self._op_lock:
            if self.state is not SandboxState.RUNNING or self._vm is None:
                raise SandboxNotRunning(f"sandbox {self.id} is {self.state.value}")
            await self._vm.pause()
            self._settle(SandboxState.PAUSED)

    async def resume(self) -> None:
        """Continue a paused sandbox where it stopped."""
        async with self._op_lock:
            if self.state is not SandboxState.PAUSED or self._vm is None:
                raise SandboxNotRunning(f"sandbox {self.id} is {self.state.value}, not paused")
            await self._vm.resume()
            self._settle(SandboxState.RUNNING)

    async def snapshot(self) -> Snapshot:
        """Save this sandbox (memory, processes, files) as a ``Snapshot`` that
        ``create(from_snapshot=...)`` restores, as often as wanted. The sandbox goes on
        running (paused for the moment of the save)."""
        return await self._snapshot("user")

    async def _snapshot(self, kind: Literal["user", "fork"]) -> Snapshot:
        if not self._provider.capabilities.snapshots:
            raise SnapshotError(f"the {self._provider.name} provider cannot save snapshots")
        if self.config.drives:
            raise SnapshotError("sandboxes with extra drives cannot be snapshotted (yet)")
        async with self._op_lock:
            was_paused = self.state is SandboxState.PAUSED
            if was_paused and self._vm is not None:
                await self._vm.resume()
                self._settle(SandboxState.RUNNING)
            self._require_agent()
            vm = self._vm
            assert vm is not None
            snap_id = new_snapshot_id()
            directory = snapshots_dir() / snap_id
            kernel, rootfs = vm.spec.kernel, vm.spec.rootfs
            assert kernel is not None and rootfs is not None  # a provider with snapshots
            took, frozen = await self._capture(directory, resume=True)
            snap = saved(
                snapshot_id=snap_id,
                kind=kind,
                template=self.template,
                directory=directory,
                files=directory,
                kernel=kernel,
                backing=rootfs,
                config=self.config,
                engine=self.engine,
                took=took,
                network=self.config.network.mode,
                env=dict(self.config.env),
                source_sandbox=self.id,
                frozen=frozen,
            )
            snap.write_manifest()
            if was_paused:
                await vm.pause()
                self._settle(SandboxState.PAUSED)
            log.info("sandbox %s saved as %s in %.0f ms", self.id, snap_id, took * 1000)
            return snap

    async def fork(self, n: int = 1) -> list[AsyncSandbox]:
        """``n`` new, independent sandboxes that continue from this one's current state
        (memory, processes, files). They outlive this sandbox, and are adoptable if it
        is."""
        check_int("fork count", n, 1, 64)
        snap = await self._snapshot("fork")
        results = await asyncio.gather(
            *(
                AsyncSandbox._create_local(
                    from_snapshot=snap,
                    provider=self._provider.name,
                    network=self.config.network.mode,
                    allow=self.config.network.allow,
                    ports=self.config.network.ports,
                    adoptable=self._adoptable,
                )
                for _ in range(n)
            ),
            return_exceptions=True,
        )
        children = [r for r in results if isinstance(r, AsyncSandbox)]
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await asyncio.gather(*(c.kill() for c in children), return_exceptions=True)
            drop_unused_fork_snapshot(snap)
            raise failure
        return children

    # --- teardown

    async def kill(self) -> None:
        """Stop the VM and remove everything it had on disk. Safe to call twice.

        It does not depend on the guest: the VMM is stopped first (SIGKILL; a VM with
        writable drives gets 2 s to unmount them and the VMM 1 s to flush them), then the
        agent channel is dropped and every call in flight fails; an operation holding
        the sandbox (a snapshot, a pause) then ends at once."""
        if self._released:
            return
        if not self._stopping:
            await self._release_drives()
        self._stopping = True
        await self._teardown(SandboxState.KILLED)
        log.info("sandbox %s killed", self.id)

    async def _release_drives(self) -> None:
        """Unmount writable drives so that what the guest wrote is on the image file."""
        writable = [d.mount for d in self.config.drives if not d.read_only]
        if not writable or self._agent is None or not self.is_running():
            return
        try:
            reply = await self._agent.call("release", paths=writable, timeout=2.0)
            log.debug("%s: drives released: %s", self.id, reply.get("drives"))
        except NovaSandboxError as exc:
            log.warning("%s: could not release drives before kill: %s", self.id, exc)

    # --- lifetime

    @property
    def deadline(self) -> float | None:
        """When the lifetime ends (``time.time()`` seconds), or None for no limit."""
        return self._deadline

    def _remaining_lifetime(self) -> float | None:
        return None if self._deadline is None else max(0.001, self._deadline - time.time())

    def _arm_lifetime(self, seconds: float | None) -> None:
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
            self._lifetime_timer = None
        self._lifetime = seconds
        self._deadline = None if seconds is None else time.time() + seconds
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._lifetime_timer = loop.call_later(
                seconds, lambda: loop.create_task(self._expire())
            )

    def _lifetime_over(self) -> bool:
        """Whether the lifetime has ended (allowing for the guest's clock running ahead)."""
        return self._deadline is not None and time.time() >= self._deadline - 1.0

    def _expired_error(self) -> SandboxExpired:
        return SandboxExpired(
            f"sandbox {self.id} reached the end of its lifetime "
            f"({self._lifetime or 0:.0f} s) and was killed; give it longer with "
            "Sandbox.create(..., timeout=SECONDS) or sb.set_timeout(SECONDS) "
            "(None: no limit)"
        )

    @property
    def expired(self) -> bool:
        """Whether the sandbox was killed because its lifetime ended."""
        return self._expired

    async def _expire(self) -> None:
        log.warning(
            "sandbox %s reached the end of its lifetime (%.0f s): killing it",
            self.id,
            self._lifetime or 0,
        )
        self._expired = True
        await self.kill()

    async def set_timeout(self, timeout: float | None) -> None:
        """Set the remaining lifetime to ``timeout`` seconds from now (None: no limit)."""
        seconds = validate_lifetime(timeout)
        agent = self._require_agent()
        self._arm_lifetime(seconds)
        self._record()
        await agent.call("lifetime", seconds=seconds)

    async def _teardown(self, end: SandboxState) -> None:
        """Release everything, VMM first, without waiting on the guest, then end in state
        ``end``. Calls in flight fail with "was killed" as soon as the VMM is gone (a
        moment before the state says so). Idempotent."""
        if self._lifetime_timer is not None:
            self._lifetime_timer.cancel()
            self._lifetime_timer = None
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        killed = (
            self._expired_error()
            if self._expired
            else SandboxNotRunning(f"sandbox {self.id} was killed")
        )
        if self._agent is not None:
            self._agent.ending(killed)
        if self._vm is not None:
            await self._vm.stop(timeout=1.0)
        if self._held is not None:
            await asyncio.to_thread(self._held.release)
        if self._agent is not None:
            self._agent.abort(killed)
            await self._agent.wait_closed()
            self._agent = None
        with _LIVE_LOCK:
            _LIVE.pop(self.id, None)
        remove_state(self.paths.state_dir)
        if self.source_snapshot is not None and self.source_snapshot.ephemeral:
            drop_unused_fork_snapshot(self.source_snapshot)
        self._released = True
        self._state = end  # once everything is released

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    @staticmethod
    async def list(
        *,
        labels: Mapping[str, str] | None = None,
        server: str | None = None,
        api_key: str | None = None,
    ) -> list[SandboxInfo] | list[RemoteSandboxInfo]:
        """Sandboxes recorded on this host whose VM is alive; with a server (``server``,
        else ``NOVASANDBOX_SERVER``) the key's sandboxes there that have all of
        ``labels``."""
        where = resolve_server(server, api_key)
        if where is not None:
            return await RemoteSandbox.list_on(where, labels)
        if labels:
            raise ConfigError("labels are kept by a server: give server= to filter on them")
        return [info for info in list_sandboxes() if info.alive]

    @staticmethod
    async def list_snapshots(
        *, server: str | None = None, api_key: str | None = None
    ) -> builtins.list[Snapshot] | builtins.list[RemoteSnapshot]:
        """The user snapshots on this host (``novasandbox.list_snapshots()``); with a
        server (``server``, else ``NOVASANDBOX_SERVER``) the key's snapshots there."""
        where = resolve_server(server, api_key)
        if where is not None:
            return await list_snapshots_on(where)
        return list_snapshots()

    @staticmethod
    async def delete_snapshot(
        snapshot: Snapshot | RemoteSnapshot | str,
        *,
        server: str | None = None,
        api_key: str | None = None,
    ) -> None:
        """Delete a snapshot (or the one with this id) of this host
        (``novasandbox.delete_snapshot``) or, with a server, one of the key's there.
        Sandboxes restored from it run on."""
        where = resolve_server(server, api_key)
        if where is not None:
            await delete_snapshot_on(where, snapshot)
            return
        if isinstance(snapshot, RemoteSnapshot):
            raise ConfigError(
                f"snapshot {snapshot.id} is kept by the server {snapshot.server}: give "
                "server= to delete it there"
            )
        delete_snapshot(snapshot)

    # --- what only a server offers

    async def upload_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        """Only a sandbox on a server has signed URLs (``RemoteSandbox.upload_url``):
        a local one raises ``ServerRequired``."""
        raise ServerRequired(
            "a signed URL needs a server to serve it: create the sandbox with server= "
            "(novasandbox serve); a local sandbox moves files with sandbox.files"
        )

    async def download_url(self, path: str, expires: int = DEFAULT_URL_EXPIRES) -> str:
        """Only a sandbox on a server has signed URLs (``RemoteSandbox.download_url``):
        a local one raises ``ServerRequired``."""
        raise ServerRequired(
            "a signed URL needs a server to serve it: create the sandbox with server= "
            "(novasandbox serve); a local sandbox moves files with sandbox.files"
        )

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self.template} state={self.state.value}>"


__all__ = ["DEFAULT_BOOT_TIMEOUT", "DEFAULT_LIFETIME", "AsyncSandbox", "SandboxState"]
