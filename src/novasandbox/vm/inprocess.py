"""The in-process provider: no VM. The real guest agent (``guest/agent.py --stdio``, the
same code that serves the virtio port inside a guest) runs on the host as a child of
this process, reached over a socket pair.

THIS ISOLATES NOTHING. Commands run on the host, as the user running NovaSandbox, and
file operations touch the host's files. It exists so that NovaSandbox's own logic
(lifecycle, states, lifetime, pools, records, gc, the agent protocol, later the server)
gets fast tests without booting a kernel, and for development. ``novasandbox.vm``
refuses it unless ``NOVASANDBOX_ALLOW_INPROCESS=1``; it is never the default.

What it does not do: snapshots (and so restores, forks, shape snapshots), networks
other than "none", extra drives, a new agent after the channel broke. Its "machine" is
the agent's process tree: the agent is a child subreaper, so processes its commands
leave behind stay in that tree; ``pause`` stops the tree (SIGSTOP), ``stop`` kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..errors import ProviderError, VMStartError
from ..host.resources import HostResources
from ..procfs import PROC, process_start_time
from ..records import vmm_marker
from ..snapshots import Engine
from .base import Capabilities, VMSpec

AGENT = Path(__file__).resolve().parent.parent / "guest" / "agent.py"
PR_SET_CHILD_SUBREAPER = 36
_LAUNCH = (
    "import ctypes, os, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_CHILD_SUBREAPER}, 1, 0, 0, 0)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)
"""Makes the agent a child subreaper before it starts: orphans of its commands are
re-parented to it, not to init, so ``stop`` finds and kills them."""


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (from /proc; parents first)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _signal_tree(root: int, sig: int) -> None:
    for pid in process_tree(root):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class InProcessVM:
    """The agent process standing in for a VM."""

    def __init__(self, spec: VMSpec, proc: subprocess.Popen[bytes], channel: socket.socket):
        self.spec = spec
        self._proc = proc
        self._channel: socket.socket | None = channel
        self.start_time = process_start_time(proc.pid)
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc.poll() is None

    async def open_channel(
        self, deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        channel, self._channel = self._channel, None
        if channel is None:
            raise ProviderError("the inprocess provider serves one agent channel per sandbox")
        if not self.is_running():
            channel.close()
            raise VMStartError(f"the agent exited: {self.exit_reason()}")
        return await asyncio.open_unix_connection(sock=channel)

    async def load(self, memory: Path, deadline: float) -> None:
        raise ProviderError("the inprocess provider cannot restore snapshots")

    async def wait_restored(self, deadline: float) -> None:
        raise ProviderError("the inprocess provider cannot restore snapshots")

    async def pause(self) -> None:
        _signal_tree(self.pid, signal.SIGSTOP)

    async def resume(self) -> None:
        _signal_tree(self.pid, signal.SIGCONT)

    async def save(self, memory: Path, disk: Path, timeout: float = 120.0) -> None:
        raise ProviderError("the inprocess provider cannot save snapshots")

    def exit_reason(self) -> str:
        code = self._proc.poll()
        if code is None:
            return "it is running"
        if code < 0:
            return f"the agent was killed by signal {-code}"
        return f"the agent exited with status {code}"

    async def stop(self, timeout: float = 2.0) -> None:
        """Kill the agent and every process of its tree; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.is_running():
            _signal_tree(self.pid, signal.SIGKILL)
        await asyncio.to_thread(self._proc.wait)


class InProcessProvider:
    """Runs the guest agent on the host, without a VM (see the module's docstring)."""

    name = "inprocess"
    capabilities = Capabilities(
        snapshots=False,
        networks=frozenset({"none"}),
        drives=False,
        needs_image=False,
        isolated=False,
    )

    def engine(self) -> Engine:
        return Engine("none", f"inprocess python {sys.version.split()[0]}")

    def accel_reason(self) -> str:
        return "no VM: guest code runs on this host, without isolation"

    async def adopt(self, spec: VMSpec, pid: int, start_time: int) -> InProcessVM:
        raise ProviderError("the inprocess provider's sandboxes cannot be adopted")

    async def start(self, spec: VMSpec, held: HostResources) -> InProcessVM:
        host_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable,
            "-c",
            _LAUNCH,
            "-I",
            str(AGENT),
            "--stdio",
            vmm_marker(spec.vm_id).decode(),
        ]
        try:
            with open(spec.paths.vmm_log, "wb") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=agent_end.fileno(),
                    stdout=agent_end.fileno(),
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                    cwd=spec.paths.state_dir,
                )
        except BaseException:
            host_end.close()
            raise
        finally:
            agent_end.close()
        spec.paths.console_log.touch()
        return InProcessVM(spec, proc, host_end)
