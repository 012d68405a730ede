"""The QEMU provider: runs the QEMU process that ``qemu_argv.py`` describes, and speaks
QMP to it (pause, resume, save, quit).

Works on any Linux host: hardware KVM where the host really has it (``kvm_intel`` or
``kvm_amd`` loaded), QEMU's software emulation (TCG) everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

from ..errors import ConfigError, HostToolMissing, ProviderError, VMStartError
from ..host import limits, netguard
from ..host.resources import HostResources
from ..network import DETACHED
from ..procfs import process_start_time, same_process
from ..records import vmm_marker
from ..snapshots import Engine
from ..templates import backing_chain, image_format, qcow2_backing
from .base import Capabilities, VMSpec
from .qemu_argv import (
    CPU_TAGS,
    QEMU_BINARY,
    QEMU_IMG,
    DiskFds,
    build_argv,
    guest_cpu,
    overlay_argv,
)

log = logging.getLogger("novasandbox.qemu")


@dataclass(frozen=True, slots=True)
class AccelChoice:
    name: str
    reason: str


def choose_accel(
    env: Mapping[str, str] | None = None,
    sys_module: Path = Path("/sys/module"),
    dev_kvm: Path = Path("/dev/kvm"),
) -> AccelChoice:
    """Pick KVM only where the host has hardware virtualization; TCG otherwise.

    ``/dev/kvm`` alone is not enough: the ``kvm_pvm`` module also provides it and cannot
    boot ordinary kernels. ``NOVASANDBOX_ACCEL=kvm|tcg`` overrides the choice.
    """
    env = os.environ if env is None else env
    forced = env.get("NOVASANDBOX_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ConfigError(f"NOVASANDBOX_ACCEL must be 'kvm' or 'tcg', got {forced!r}")
        return AccelChoice(forced, "set by NOVASANDBOX_ACCEL")
    hardware = [m for m in ("kvm_intel", "kvm_amd") if (sys_module / m).exists()]
    if hardware and dev_kvm.exists():
        if os.access(dev_kvm, os.R_OK | os.W_OK):
            return AccelChoice("kvm", f"hardware KVM ({hardware[0]} loaded, /dev/kvm usable)")
        return AccelChoice("tcg", f"{hardware[0]} loaded but /dev/kvm is not accessible")
    if (sys_module / "kvm_pvm").exists():
        return AccelChoice("tcg", "/dev/kvm is kvm_pvm (cannot boot standard kernels)")
    if dev_kvm.exists():
        return AccelChoice("tcg", "/dev/kvm present but neither kvm_intel nor kvm_amd is loaded")
    return AccelChoice("tcg", "no /dev/kvm on this host")


def make_jail(spec: VMSpec) -> None:
    """The empty root a confined QEMU is chrooted into. A networked one finds a copy of
    the host's resolv.conf there: its DNS forwarder reads it to know where to send the
    guest's queries."""
    jail = spec.paths.jail
    if spec.host.network == "none":
        jail.mkdir(mode=0o500, exist_ok=True)
        return
    (jail / "etc").mkdir(mode=0o711, parents=True, exist_ok=True)
    jail.chmod(0o711)
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        text = ""
    resolv = jail / "etc" / "resolv.conf"
    resolv.write_text(text)
    resolv.chmod(0o444)


def open_disks(spec: VMSpec) -> DiskFds:
    """Open the VM's disks for ``build_argv``; the caller closes them (``close_disks``)
    once QEMU has started."""
    opened: list[int] = []

    def fds(path: str | os.PathLike[str], writable: bool) -> tuple[int, ...]:
        modes = (os.O_RDWR, os.O_RDONLY) if writable else (os.O_RDONLY,)
        for mode in modes:
            opened.append(os.open(path, mode | os.O_CLOEXEC))
        return tuple(opened[-len(modes) :])

    try:
        lower: list[tuple[int, str]] = []
        if spec.rootfs is not None and spec.rootfs_format == "qcow2":
            for layer in backing_chain(spec.rootfs)[1:]:
                try:
                    (fd,) = fds(layer, False)
                except FileNotFoundError:
                    raise VMStartError(
                        f"the disk chain of {spec.rootfs} is broken: {layer} is gone"
                    ) from None
                lower.append((fd, image_format(layer)))
        return DiskFds(
            base=fds(spec.rootfs, False) if spec.rootfs is not None else (),
            overlay=fds(spec.paths.overlay, True),
            drives=tuple(fds(d.path, not d.read_only) for d in spec.machine.drives),
            lower=tuple(lower),
        )
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


def inherited_fds(disks: DiskFds, incoming: int | None) -> tuple[int, ...]:
    fds = (*disks.base, *disks.overlay, *(fd for d in disks.drives for fd in d))
    fds += tuple(fd for fd, _ in disks.lower)
    return fds + ((incoming,) if incoming is not None else ())


def close_disks(disks: DiskFds) -> None:
    for fd in inherited_fds(disks, None):
        with contextlib.suppress(OSError):
            os.close(fd)


def find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostToolMissing(name, package)
    return path


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, which TCG guests see as theirs (QEMU reads the host's
    TSC for them); None when unknown. From ``/proc/cpuinfo``: x86 Linux derives
    ``bogomips`` from the TSC (500 kHz per BogoMIPS, 10 kHz precision) where the TSC
    runs at a constant rate; elsewhere (another architecture, a TSC that varies) None,
    and the guest calibrates its clock itself."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    return tsc_khz_from_cpuinfo(text)


def tsc_khz_from_cpuinfo(text: str) -> int | None:
    """``host_tsc_khz`` from the text of ``/proc/cpuinfo`` (its first processor). Pure."""
    flags: set[str] = set()
    bogomips: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "bogomips" and bogomips is None:
            try:
                bogomips = float(value)
            except ValueError:
                return None
        elif not key and (flags or bogomips is not None):
            break  # the end of the first processor's block
    if "constant_tsc" not in flags or bogomips is None or not 100 <= bogomips <= 20000:
        return None
    return round(bogomips * 500)


def qemu_version(qemu: str | None = None) -> str:
    """QEMU's version line (cached per binary and modification time)."""
    binary = qemu or find_tool(QEMU_BINARY, "qemu-system-x86")
    return _qemu_version(binary, os.stat(binary).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _qemu_version(binary: str, mtime_ns: int) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
_LIBC = ctypes.CDLL(None, use_errno=True)
_THP_LOCK = threading.Lock()
_thp_spawning = 0


@contextlib.contextmanager
def no_huge_pages() -> Iterator[None]:
    """With ``NOVASANDBOX_QEMU_THP=0``, start the VMMs spawned inside this block without
    transparent huge pages (otherwise it does nothing).

    QEMU asks for huge pages for the guest's RAM; where the host grants them
    (``/sys/kernel/mm/transparent_hugepage/enabled`` "madvise" or "always"), each 4 KiB
    page a restore writes costs a whole 2 MiB page: an idle restored 256 MiB guest holds
    ~54 MiB instead of the ~35 MiB its memory image has (PSS per idle sandbox 80 -> 59
    MiB with 10 of them), but without huge pages a restore took ~35% longer (measured
    under TCG on a 2-core VM host: ``benchmarks/bench_speed.py``), so they stay on
    unless asked. ``prctl`` PR_SET_THP_DISABLE is a flag of this process's memory that
    a child keeps across exec: set while spawning (this process has no huge pages
    meanwhile), cleared after the last concurrent spawn, left alone where it was set
    already."""
    global _thp_spawning
    if os.environ.get("NOVASANDBOX_QEMU_THP", "1").strip() != "0":
        yield
        return
    with _THP_LOCK:
        if _thp_spawning == 0 and _LIBC.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0:
            _LIBC.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
            _thp_spawning = 1
        elif _thp_spawning:
            _thp_spawning += 1
    try:
        yield
    finally:
        with _THP_LOCK:
            if _thp_spawning:
                _thp_spawning -= 1
                if _thp_spawning == 0:
                    _LIBC.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


class AdoptedProcess:
    """A VMM that another (dead) process started, seen through ``/proc``: what QemuVM
    needs of a ``Popen``. Its exit status is not ours to collect."""

    def __init__(self, pid: int, start_time: int, marker: bytes) -> None:
        self.pid = pid
        self._start_time = start_time
        self._marker = marker

    def poll(self) -> int | None:
        return None if same_process(self.pid, self._start_time, self._marker) else 0

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.01)
        return 0


class QemuVM:
    """One running QEMU process and its QMP connection."""

    def __init__(self, spec: VMSpec, proc: subprocess.Popen[bytes] | AdoptedProcess) -> None:
        self.spec = spec
        self._proc = proc
        self._qmp: QMPClient | None = None
        self._qmp_lock = asyncio.Lock()
        self.start_time = process_start_time(proc.pid)
        self._stopped = False
        self._handed_over: Path | None = None
        """The snapshot file QEMU was given to restore (``hand_over``)."""

    @property
    def pid(self) -> int:
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc.poll() is None

    async def open_channel(
        self, deadline: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the socket QEMU serves the agent's virtio-serial port on (each new
        connection reaches the guest's port afresh)."""
        path = str(self.spec.paths.agent_socket)
        while True:
            try:
                return await asyncio.open_unix_connection(path)
            except (FileNotFoundError, ConnectionRefusedError):
                if not self.is_running():
                    raise VMStartError(
                        f"the VM exited before its agent channel opened: {self.exit_reason()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise VMStartError("the agent channel never opened") from None
                await asyncio.sleep(0.002)

    async def connect_qmp(self, deadline: float) -> None:
        """Connect QMP once QEMU listens. The socket file appears at bind(), a moment before
        listen(), so a plain connection probes it first (the QMP client logs every failed
        attempt as an error)."""
        sock = str(self.spec.paths.control_socket)
        while True:
            if not self.is_running():
                raise VMStartError(f"QEMU exited: {self.exit_reason()}")
            try:
                _, probe = await asyncio.open_unix_connection(sock)
                probe.close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise VMStartError(f"QEMU's QMP socket never opened: {exc}") from exc
                await asyncio.sleep(0.002)
        qmp = QMPClient(f"novasandbox-{self.spec.vm_id}")
        try:
            await qmp.connect(sock)
        except ConnectError as exc:
            raise VMStartError(f"cannot connect to QEMU's QMP socket: {exc}") from exc
        self._qmp = qmp

    async def _execute(self, cmd: str, args: dict[str, object] | None = None) -> object:
        async with self._qmp_lock:
            if self._qmp is None:
                await self.connect_qmp(time.monotonic() + 10.0)
        assert self._qmp is not None
        try:
            return await self._qmp.execute(cmd, args)
        except Exception as exc:  # qemu.qmp's ExecuteError, or the connection went away
            raise ProviderError(f"QMP {cmd} failed: {exc}") from exc

    async def pause(self) -> None:
        """Stop the guest's CPUs (the VM keeps its memory and devices)."""
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    async def hand_over(self, memory: Path, deadline: float) -> None:
        """Give this QEMU, started with ``-incoming defer``, the snapshot file it will
        restore (``load`` starts it): opened here and passed on the QMP socket (QEMU may
        not open files). Done when it starts, so that ``load`` is one request."""
        if not self.spec.defer_incoming:
            raise ProviderError("this QEMU was not started to wait for a snapshot")
        fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._give_fd(fd, "incoming", deadline)
        finally:
            os.close(fd)
        self._handed_over = memory

    async def _give_fd(self, fd: int, name: str, deadline: float) -> None:
        """Hand ``fd`` to QEMU as ``name`` (SCM_RIGHTS on the QMP socket, then ``getfd``):
        QEMU may not open files (its seccomp filter). The caller closes its own copy."""
        async with self._qmp_lock:
            if self._qmp is None:
                await self.connect_qmp(deadline)
            assert self._qmp is not None
            self._qmp.send_fd_scm(fd)
        await self._execute("getfd", {"fdname": name})

    async def load(self, memory: Path, deadline: float) -> None:
        """Restore ``memory`` into this QEMU, started with ``-incoming defer``."""
        if self._handed_over != memory:
            await self.hand_over(memory, deadline)
        await self._execute("migrate-incoming", {"uri": "fd:incoming"})

    async def wait_restored(self, deadline: float) -> None:
        """Wait until a restore has loaded the memory snapshot (the VM is then paused)."""
        while (status := await self.query_status()) in ("inmigrate", "prelaunch"):
            if not self.is_running():
                raise VMStartError(f"QEMU exited while restoring: {self.vmm_error()}")
            if time.monotonic() > deadline:
                raise VMStartError("QEMU did not finish loading the snapshot in time")
            await asyncio.sleep(0.002)
        if status not in ("paused", "postmigrate", "running"):
            raise VMStartError(f"restore ended in state {status!r}: {self.vmm_error()}")

    async def save(self, memory: Path, disk: Path, timeout: float = 120.0) -> None:
        """Write the VM's device and memory state to ``memory`` (QMP migrate: a running
        VM is live-migrated and ends paused, "postmigrate"; ``resume`` continues it), then
        copy its overlay, which QEMU has flushed by then, to ``disk``.

        QEMU may not open files or spawn programs (its seccomp filter): the file is
        opened here and handed over on the QMP socket (SCM_RIGHTS)."""
        await self._execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        fd = os.open(memory, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await self._give_fd(fd, "snapshot", time.monotonic() + 10.0)
        finally:
            os.close(fd)
        await self._execute("migrate", {"uri": "fd:snapshot"})
        deadline = time.monotonic() + timeout
        while True:
            info = await self._execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                detail = info.get("error-desc", "") if isinstance(info, dict) else ""
                raise ProviderError(f"saving the VM state failed ({status}): {detail}")
            await asyncio.sleep(0.005)
        await asyncio.to_thread(shutil.copyfile, self.spec.paths.overlay, disk)

    async def query_status(self) -> str:
        reply = await self._execute("query-status")
        assert isinstance(reply, dict)
        return str(reply["status"])

    def vmm_error(self) -> str:
        try:
            return self.spec.paths.vmm_log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def exit_reason(self) -> str:
        code = self._proc.poll()
        if code is None:
            return "it is running"
        if isinstance(self._proc, AdoptedProcess):
            detail = self.vmm_error()[-300:]
            return f"the VMM exited (adopted: its exit status is unknown here): {detail}"
        if code < 0:
            return f"the VMM was killed by signal {-code}"
        if code:
            return f"the VMM exited with status {code}: {self.vmm_error()[-300:]}"
        return "the guest shut down"

    async def stop(self, timeout: float = 2.0) -> None:
        """End QEMU; idempotent. With writable drives it quits through QMP (so that QEMU
        flushes them); otherwise, as nothing of the VM is kept, SIGKILL is enough."""
        if self._stopped:
            return
        self._stopped = True
        writable = any(not d.read_only for d in self.spec.machine.drives)
        if writable and self.is_running():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._execute("quit"), timeout)
            deadline = time.monotonic() + timeout
            while self.is_running() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), timeout)
            self._qmp = None
        await asyncio.to_thread(self._proc.wait)


class QemuProvider:
    """Starts QEMU microVMs."""

    name = "qemu"
    capabilities = Capabilities(
        snapshots=True,
        networks=frozenset({"none", "nat", "tap", DETACHED}),
        drives=True,
        needs_image=True,
        isolated=True,
        adoptable=True,
        prestart=True,
    )

    def __init__(self, qemu: str | None = None, qemu_img: str | None = None) -> None:
        self._qemu = qemu
        self._qemu_img = qemu_img

    @property
    def qemu(self) -> str:
        return self._qemu or find_tool(QEMU_BINARY, "qemu-system-x86")

    @property
    def qemu_img(self) -> str:
        return self._qemu_img or find_tool(QEMU_IMG, "qemu-utils")

    def engine(self) -> Engine:
        accel = choose_accel().name
        return Engine(accel, f"{qemu_version(self._qemu)} cpu={CPU_TAGS[guest_cpu(accel)]}")

    def accel_reason(self) -> str:
        return choose_accel().reason

    def _overlay_seed(self, backing: Path, backing_format: str) -> Path:
        """An empty qcow2 overlay of ``backing``, made once with qemu-img and kept beside
        it; each sandbox's overlay is a copy (cheaper than running qemu-img each time).
        It names ``backing`` where it is now: one that names another place (the cache
        was copied or moved) is made again."""
        seed = backing.parent / f".{backing.name}.overlay-seed.qcow2"
        backing = Path(os.path.abspath(backing))
        if qcow2_backing(seed) != backing:
            partial = seed.with_name(f"{seed.name}.{os.getpid()}.{time.monotonic_ns()}")
            made = subprocess.run(
                overlay_argv(backing, partial, self.qemu_img, backing_format),
                capture_output=True,
                text=True,
            )
            if made.returncode != 0:
                partial.unlink(missing_ok=True)
                raise VMStartError(f"qemu-img could not create an overlay: {made.stderr.strip()}")
            partial.replace(seed)
        return seed

    async def start(self, spec: VMSpec, held: HostResources) -> QemuVM:
        """Create the overlay and start QEMU (QMP is connected when first needed)."""
        paths = spec.paths
        if spec.kernel is None or spec.rootfs is None:
            raise ConfigError("QEMU boots a kernel and a root file system")
        limits.admit(spec.machine.memory_mib, limits.available_memory_mib(), limits.reserve_mib())
        seed = self._overlay_seed(spec.rootfs, spec.rootfs_format)
        shutil.copyfile(seed, paths.overlay)
        if spec.host.confine is not None:
            make_jail(spec)
        disks = open_disks(spec)
        incoming = None
        proc: subprocess.Popen[bytes] | None = None
        guard_sock: socket.socket | None = None
        stage_sock: socket.socket | None = None
        try:
            if spec.incoming and not spec.defer_incoming:
                incoming = os.open(spec.incoming, os.O_RDONLY | os.O_CLOEXEC)
            tap_fd = held.tap_fd
            argv = build_argv(
                spec,
                disks,
                self.qemu,
                incoming_fd=incoming,
                tap_fd=tap_fd,
                tsc_khz=host_tsc_khz() if spec.accel == "tcg" else None,
            )
            log.debug("starting %s: %s", spec.vm_id, " ".join(argv))
            passed = inherited_fds(disks, incoming) + ((tap_fd,) if tap_fd is not None else ())
            if held.guard_refuse is not None:
                guard_sock, stage_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                argv = netguard.stage_argv(sys.executable, stage_sock.fileno()) + argv
                passed += (stage_sock.fileno(),)
            argv = held.spawn_prefix() + argv
            with open(paths.vmm_log, "wb") as vmm_log, no_huge_pages():
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=vmm_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=passed,
                )
            if guard_sock is not None:
                assert stage_sock is not None
                stage_sock.close()
                stage_sock = None
                listener = await asyncio.to_thread(netguard.receive_listener, guard_sock, 30.0)
                held.start_guard(listener, asyncio.get_running_loop())
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            raise
        finally:
            for sock in (guard_sock, stage_sock):
                if sock is not None:
                    sock.close()
            close_disks(disks)
            held.close_fd()
            if incoming is not None:
                os.close(incoming)
        limits.limit_vmm(proc.pid, spec.machine.memory_mib)
        log.debug("%s: QEMU pid %d started", spec.vm_id, proc.pid)
        vm = QemuVM(spec, proc)
        if spec.defer_incoming:  # connected and given the file now: ``load`` is one request
            try:
                assert spec.incoming is not None
                await vm.hand_over(spec.incoming, time.monotonic() + 30.0)
            except BaseException:
                await vm.stop(timeout=0)
                raise
        return vm

    async def adopt(self, spec: VMSpec, pid: int, start_time: int) -> QemuVM:
        """Take over a QEMU that a dead process started: QMP and the agent's socket accept
        a new connection; the process is watched and killed through ``/proc``."""
        proc = AdoptedProcess(pid, start_time, vmm_marker(spec.vm_id))
        if proc.poll() is not None:
            raise VMStartError(f"sandbox {spec.vm_id}'s VMM (pid {pid}) is gone")
        vm = QemuVM(spec, proc)
        await vm.connect_qmp(time.monotonic() + 10.0)
        return vm
