"""Sandboxes: ``AsyncSandbox`` is the one implementation; ``Sandbox`` is its sync facade.

Lifecycle (an explicit state machine)::

    starting --> running --> killed
        \\            \\
         +--> error    +--> crashed   (the VMM exited on its own)

``create`` resolves the template, validates the machine config, starts the VM through
the provider, connects to the guest agent and mounts the extra drives. A failure at any
step kills the VM and removes its state directory before the error propagates.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .agent_client import AgentClient
from .commands import AsyncCommands
from .config import Drive, MachineConfig
from .errors import (
    AgentError,
    NovaSandboxError,
    SandboxNotRunning,
    VMStartError,
)
from .files import AsyncFiles
from .providers.base import VMPaths, VMSpec
from .providers.qemu import QemuProvider, QemuVM, choose_accel, drive_serial
from .state import (
    SandboxInfo,
    list_sandboxes,
    new_sandbox_id,
    remove_state,
    sandboxes_dir,
    write_record,
)
from .templates import TemplateManager

log = logging.getLogger("novasandbox")

DEFAULT_BOOT_TIMEOUT = 120.0


class SandboxState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    KILLED = "killed"
    CRASHED = "crashed"
    ERROR = "error"


# Sandboxes of this process, killed at interpreter exit if their owner forgot.
_LIVE: dict[str, tuple[int, Path]] = {}
_LIVE_LOCK = threading.Lock()


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
        remove_state(directory)


class AsyncSandbox:
    """A running microVM sandbox (asyncio). Create with ``await AsyncSandbox.create(...)``."""

    def __init__(
        self, *, sandbox_id: str, template: str, config: MachineConfig, paths: VMPaths, accel: str
    ) -> None:
        self.id = sandbox_id
        self.template = template
        self.config = config
        self.paths = paths
        self.accel = accel
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self._state = SandboxState.STARTING
        self._vm: QemuVM | None = None
        self._agent: AgentClient | None = None
        self._started = time.monotonic()
        self._created_at = time.time()
        self._kill_lock = asyncio.Lock()

    # --- creation

    @classmethod
    async def create(
        cls,
        template: str = "python",
        *,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive] = (),
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        templates: TemplateManager | None = None,
    ) -> AsyncSandbox:
        """Boot a sandbox from ``template`` and wait until its agent answers."""
        manager = templates or TemplateManager()
        built = manager.require_built(template)
        config = MachineConfig(
            vcpus=built.template.vcpus if vcpus is None else vcpus,
            memory_mib=built.template.memory_mib if memory_mib is None else memory_mib,
            drives=tuple(drives),
            env=env or {},
        )
        accel = choose_accel()
        sandbox_id = new_sandbox_id()
        directory = sandboxes_dir() / sandbox_id
        directory.mkdir(parents=True, mode=0o700)
        sb = cls(
            sandbox_id=sandbox_id,
            template=template,
            config=config,
            paths=VMPaths(directory),
            accel=accel.name,
        )
        log.info(
            "creating sandbox %s from %s (%s: %s)", sandbox_id, template, accel.name, accel.reason
        )
        try:
            await sb._boot(
                QemuProvider(),
                VMSpec(sandbox_id, config, built.kernel, built.rootfs, sb.paths, accel.name),
                boot_timeout,
            )
        except BaseException as exc:
            sb._state = SandboxState.ERROR
            tail = sb.console_tail()
            await sb._teardown()
            # Our own typed errors (bad config, missing tool...) pass through as they are;
            # an agent that never answered and any lower-layer failure become VMStartError.
            # Cancellation and KeyboardInterrupt are not Exceptions and pass through.
            if isinstance(exc, VMStartError) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, NovaSandboxError) and not isinstance(exc, AgentError):
                raise
            raise VMStartError(f"sandbox {sandbox_id} failed to start: {exc}", tail) from exc
        return sb

    async def _boot(self, provider: QemuProvider, spec: VMSpec, boot_timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + boot_timeout
        self._record()
        self._vm = await provider.start(spec)
        with _LIVE_LOCK:
            _LIVE[self.id] = (self._vm.pid, self.paths.state_dir)
        self._record()
        vm = self._vm
        self._agent = await AgentClient.connect(
            vm.agent_socket,
            deadline=deadline,
            alive=vm.is_running,
            hello={"time_ns": time.time_ns(), "hostname": self.id},
        )
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
        self._record()
        log.info(
            "sandbox %s ready in %.0f ms (guest kernel %s)",
            self.id,
            (time.monotonic() - t0) * 1000,
            self._agent.info.get("kernel"),
        )

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
            ),
        )

    # --- state

    @property
    def state(self) -> SandboxState:
        if (
            self._state is SandboxState.RUNNING
            and self._vm is not None
            and not self._vm.is_running()
        ):
            self._state = SandboxState.CRASHED
        return self._state

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

    def _require_agent(self) -> AgentClient:
        state = self.state
        if state is not SandboxState.RUNNING or self._agent is None:
            raise SandboxNotRunning(f"sandbox {self.id} is {state.value}")
        return self._agent

    # --- teardown

    async def kill(self) -> None:
        """Stop the VM and remove everything it had on disk. Safe to call twice."""
        async with self._kill_lock:
            if self._state in (SandboxState.KILLED, SandboxState.ERROR):
                return
            await self._release_drives()
            await self._teardown()
            self._state = SandboxState.KILLED
            log.info("sandbox %s killed", self.id)

    async def _release_drives(self) -> None:
        """Unmount writable drives so that what the guest wrote is on the image file."""
        writable = [d.mount for d in self.config.drives if not d.read_only]
        if not writable or self._agent is None or not self.is_running():
            return
        try:
            reply = await self._agent.call("release", paths=writable, timeout=5.0)
            log.debug("%s: drives released: %s", self.id, reply.get("drives"))
        except NovaSandboxError as exc:
            log.warning("%s: could not release drives before kill: %s", self.id, exc)

    async def _teardown(self) -> None:
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        if self._vm is not None:
            await self._vm.stop()
        with _LIVE_LOCK:
            _LIVE.pop(self.id, None)
        remove_state(self.paths.state_dir)

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
    async def list() -> list[SandboxInfo]:
        """Sandboxes recorded on this host whose VM is alive."""
        return [info for info in list_sandboxes() if info.alive]

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} template={self.template} state={self.state.value}>"


__all__ = ["DEFAULT_BOOT_TIMEOUT", "AsyncSandbox", "SandboxState"]
