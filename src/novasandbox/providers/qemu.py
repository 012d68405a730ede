"""QEMU provider: ``-M microvm`` with a PVH-booted vmlinux, virtio-mmio devices, QMP control.

The translation from a ``VMSpec`` to QEMU's command line (``build_argv``) and the
accelerator choice (``choose_accel``) are pure functions with unit tests; the rest of
the module runs the process.

Works on any Linux host: hardware KVM where the host really has it (``kvm_intel`` or
``kvm_amd`` loaded), QEMU's software emulation (TCG) everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

from ..errors import (
    ConfigError,
    HostMemoryExhausted,
    HostToolMissing,
    ProviderError,
    VMStartError,
)
from ..guest.protocol import AGENT_PORT_NAME
from ..network import DETACHED, GATEWAY, GUEST_DNS, GUEST_NETWORK, guest_mac
from . import cgroups, netguard
from .base import VMSpec
from .cgroups import VMMGroup
from .hostnet import Attachment

log = logging.getLogger("novasandbox.qemu")

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
ROOT_SERIAL = "nsroot"
GUEST_INIT = "/opt/novasandbox/init"


def drive_serial(index: int) -> str:
    """The virtio-blk serial of extra drive ``index``; the agent finds the disk by it."""
    return f"nsdrive{index}"


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


def kernel_cmdline(spec: VMSpec) -> str:
    args = [
        "console=ttyS0",
        "root=/dev/vda",
        "rootfstype=ext4",
        "rw",
        f"init={GUEST_INIT}",
        "panic=-1",
        "reboot=t",
        "8250.nr_uarts=1",
        "random.trust_cpu=on",
        "quiet",
    ]
    if spec.accel == "tcg":
        # Without it about one boot in four hangs at "tsc: Marking TSC unstable".
        args.append("tsc=reliable")
        # On a loaded host the emulated timer can miss the kernel's IO-APIC timer check,
        # which then panics ("IO-APIC + timer doesn't work!"); seen in the soak run.
        args.append("no_timer_check")
    return " ".join(args)


def _opt(value: object) -> str:
    """A value inside a QEMU option string: commas are doubled so that a path cannot end
    the value and inject options of its own."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True, slots=True)
class DiskFds:
    """Descriptors QEMU inherits for its disks, one fd set (``-add-fd``) per disk.

    QEMU opens ``/dev/fdset/N`` instead of a path, so a confined QEMU (chrooted, not
    root) that reopens a disk, as it does when a restore completes, needs no access to
    the host's files. A writable disk's set holds a read-write and a read-only descriptor:
    QEMU takes the one whose access mode it asks for."""

    base: tuple[int, ...]
    overlay: tuple[int, ...]
    drives: tuple[tuple[int, ...], ...] = ()


BASE_FDSET = 1
OVERLAY_FDSET = 2


def drive_fdset(index: int) -> int:
    return OVERLAY_FDSET + index


def seccomp_option(confined: bool) -> str:
    """QEMU's seccomp filter: no obsolete syscalls, no fork/exec, no scheduler or resource
    control changes (snapshots are saved through an fd) and, unless QEMU must drop root
    itself (``-runas``, which calls setuid after the filter is in place), no set*id.
    Once it has dropped root, set*id cannot give anything back."""
    privileges = "allow" if confined else "deny"
    return f"on,obsolete=deny,elevateprivileges={privileges},spawn=deny,resourcecontrol=deny"


def build_argv(
    spec: VMSpec,
    disks: DiskFds,
    qemu: str = QEMU_BINARY,
    *,
    incoming_fd: int | None = None,
    tap_fd: int | None = None,
) -> list[str]:
    """QEMU's argv for ``spec``, its disks open at the descriptors in ``disks``. Pure:
    touches no file and starts nothing.

    With ``incoming_fd`` QEMU restores the memory snapshot it reads from that (inherited)
    file descriptor instead of booting; the device model must be the snapshot's, which
    it is when ``spec.machine`` is the same.
    """
    m = spec.machine
    p = spec.paths
    if len(disks.drives) != len(m.drives):
        raise ValueError("one fd set per drive is needed")
    accel = "kvm" if spec.accel == "kvm" else "tcg,tb-size=32"
    argv = [
        qemu,
        "-name",
        f"novasandbox-{spec.vm_id},process=novasandbox-{spec.vm_id}",
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
        "-accel",
        accel,
        "-cpu",
        "host" if spec.accel == "kvm" else "qemu64",
        "-smp",
        str(m.vcpus),
        "-m",
        f"{m.memory_mib}M",
        "-sandbox",
        seccomp_option(spec.confine is not None),
    ]
    if spec.confine is not None:
        argv += [
            "-runas",
            f"{spec.confine.uid}:{spec.confine.gid}",
            "-chroot",
            str(p.jail),
        ]
    argv += [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(spec.kernel),
        "-append",
        kernel_cmdline(spec),
        "-serial",
        f"file:{_opt(p.console_log)}",
        "-qmp",
        f"unix:{_opt(p.control_socket)},server=on,wait=off",
    ]
    sets = [(BASE_FDSET, disks.base), (OVERLAY_FDSET, disks.overlay)]
    sets += [(drive_fdset(i), fds) for i, fds in enumerate(disks.drives, start=1)]
    for set_id, fds in sets:
        if not fds:
            raise ValueError(f"fd set {set_id} is empty")
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={set_id}"]
    argv += [
        # the root disk: a per-sandbox copy-on-write overlay; the template image (or a
        # snapshot's disk) is its read-only backing file and is never written
        "-blockdev",
        f"driver=file,node-name=base-file,filename=/dev/fdset/{BASE_FDSET},read-only=on",
        "-blockdev",
        f"driver={spec.rootfs_format},node-name=base,file=base-file,read-only=on",
        "-blockdev",
        f"driver=file,node-name=root-file,filename=/dev/fdset/{OVERLAY_FDSET},discard=unmap",
        "-blockdev",
        "driver=qcow2,node-name=root,file=root-file,backing=base,discard=unmap",
        "-device",
        f"virtio-blk-device,drive=root,serial={ROOT_SERIAL}",
    ]
    for index, drive in enumerate(m.drives, start=1):
        ro = ",read-only=on" if drive.read_only else ""
        argv += [
            "-blockdev",
            f"driver=file,node-name=drive{index}-file,filename=/dev/fdset/{drive_fdset(index)}{ro}",
            "-blockdev",
            f"driver={drive.format},node-name=drive{index},file=drive{index}-file{ro}",
            "-device",
            f"virtio-blk-device,drive=drive{index},serial={drive_serial(index)}",
        ]
    argv += network_argv(spec, tap_fd)
    argv += [
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        f"socket,id=agent,path={_opt(p.agent_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]
    if incoming_fd is not None:
        argv += ["-incoming", f"fd:{incoming_fd}"]
    return argv


def network_argv(spec: VMSpec, tap_fd: int | None = None) -> list[str]:
    """The network device of a networked sandbox and its backend. Pure.

    - "nat": QEMU's user-mode stack (slirp) on the fixed guest network, no IPv6, exposed
      ports forwarded from the host's loopback. Its egress is decided by the host's
      nftables policy (root, ``egress.py``) or the seccomp guard (``netguard.py``), also
      with an empty allow list: slirp's own ``restrict=on`` would refuse silently.
    - "tap": the TAP whose descriptor QEMU inherits as ``tap_fd`` (``tap.py``).
    - "detached": the device with no backend (template snapshots for networked sandboxes).
    """
    net = spec.machine.network
    if not net.enabled:
        return []
    device = f"virtio-net-device,mac={guest_mac(spec.vm_id)}"
    if net.mode == DETACHED:
        return ["-device", device]
    if net.mode == "tap":
        if tap_fd is None:
            raise ValueError("a tap sandbox needs its TAP's descriptor")
        return ["-netdev", f"tap,id=net0,fd={tap_fd},vhost=off", "-device", device + ",netdev=net0"]
    options = [
        "user",
        "id=net0",
        f"net={GUEST_NETWORK}",
        f"host={GATEWAY}",
        f"dns={GUEST_DNS}",
        "ipv6=off",
        "restrict=off",
    ]
    for guest_port in net.ports:
        if guest_port not in spec.host_ports:
            raise ValueError(f"no host port for guest port {guest_port}")
        options.append(f"hostfwd=tcp:127.0.0.1:{spec.host_ports[guest_port]}-:{guest_port}")
    return ["-netdev", ",".join(options), "-device", device + ",netdev=net0"]


def make_jail(spec: VMSpec) -> None:
    """The empty root a confined QEMU is chrooted into. A networked one finds a copy of
    the host's resolv.conf there: its DNS forwarder reads it to know where to send the
    guest's queries."""
    jail = spec.paths.jail
    if not spec.machine.network.enabled:
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
        return DiskFds(
            base=fds(spec.rootfs, False),
            overlay=fds(spec.paths.overlay, True),
            drives=tuple(fds(d.path, not d.read_only) for d in spec.machine.drives),
        )
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


def inherited_fds(disks: DiskFds, incoming: int | None) -> tuple[int, ...]:
    fds = (*disks.base, *disks.overlay, *(fd for d in disks.drives for fd in d))
    return fds + ((incoming,) if incoming is not None else ())


def close_disks(disks: DiskFds) -> None:
    for fd in inherited_fds(disks, None):
        with contextlib.suppress(OSError):
            os.close(fd)


def overlay_argv(
    base: Path, overlay: Path, qemu_img: str = QEMU_IMG, base_format: str = "raw"
) -> list[str]:
    return [
        qemu_img,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        base_format,
        "-b",
        str(base),
        str(overlay),
    ]


def find_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostToolMissing(name, package)
    return path


def qemu_version(qemu: str | None = None) -> str:
    """QEMU's version line (cached per binary and modification time)."""
    binary = qemu or find_tool(QEMU_BINARY, "qemu-system-x86")
    return _qemu_version(binary, os.stat(binary).st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _qemu_version(binary: str, mtime_ns: int) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


VMM_OVERHEAD_MIB = 128
"""Host memory a QEMU process needs beyond its guest's RAM (code cache, devices, I/O)."""
DEFAULT_RESERVE_MIB = 512
"""Host memory left free for everything else; ``NOVASANDBOX_MEMORY_RESERVE_MIB`` sets it."""
VMM_MAX_OPEN_FILES = 1024


def available_memory_mib(meminfo: str | None = None) -> int:
    """The host's MemAvailable, in MiB."""
    if meminfo is None:
        with open("/proc/meminfo") as f:
            meminfo = f.read()
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise ProviderError("no MemAvailable in /proc/meminfo")


def admit(memory_mib: int, available_mib: int, reserve_mib: int) -> None:
    """Refuse a VM whose guest could use up the memory the host has left. Pure."""
    needed = memory_mib + VMM_OVERHEAD_MIB
    if available_mib - needed < reserve_mib:
        raise HostMemoryExhausted(
            f"not enough host memory for a {memory_mib} MiB sandbox: {available_mib} MiB "
            f"available, {needed} MiB needed and {reserve_mib} MiB kept in reserve "
            "(NOVASANDBOX_MEMORY_RESERVE_MIB)"
        )


def reserve_mib(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get("NOVASANDBOX_MEMORY_RESERVE_MIB", "")
    try:
        return int(raw) if raw else DEFAULT_RESERVE_MIB
    except ValueError:
        raise ConfigError(
            f"NOVASANDBOX_MEMORY_RESERVE_MIB must be an integer, got {raw!r}"
        ) from None


def limit_vmm(pid: int, memory_mib: int) -> None:
    """Resource limits on a started QEMU: no core dumps (they would hold guest memory),
    a bounded number of open files, and an address space sized to its guest."""
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NOFILE: VMM_MAX_OPEN_FILES,
        resource.RLIMIT_AS: (memory_mib + 4096) << 20,
    }
    for which, value in limits.items():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            resource.prlimit(pid, which, (value, value))


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat).

    Stored with the pid so that a later kill can check it is still the same process.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


class QemuVM:
    """One running QEMU process and its QMP connection."""

    def __init__(
        self,
        spec: VMSpec,
        proc: subprocess.Popen[bytes],
        group: VMMGroup | None = None,
        network: Attachment | None = None,
    ) -> None:
        self.spec = spec
        self._proc = proc
        self.group = group
        """Its control group (None: rlimits only)."""
        self.network = network
        """Its network's host side (None: no network)."""
        self._qmp: QMPClient | None = None
        self._qmp_lock = asyncio.Lock()
        self.start_time = process_start_time(proc.pid)
        self._stopped = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def agent_socket(self) -> Path:
        return self.spec.paths.agent_socket

    def is_running(self) -> bool:
        return self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return self._proc.poll()

    async def connect_qmp(self, deadline: float) -> None:
        """Connect QMP once QEMU listens. The socket file appears at bind(), a moment before
        listen(), so a plain connection probes it first (the QMP client logs every failed
        attempt as an error)."""
        sock = str(self.spec.paths.control_socket)
        while True:
            if not self.is_running():
                raise VMStartError(f"QEMU exited with status {self.exit_code}: {self.vmm_error()}")
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

    async def wait_incoming(self, deadline: float) -> None:
        """Wait until a restore has loaded the memory snapshot (the VM is then paused)."""
        while (status := await self.query_status()) in ("inmigrate", "prelaunch"):
            if not self.is_running():
                raise VMStartError(f"QEMU exited while restoring: {self.vmm_error()}")
            if time.monotonic() > deadline:
                raise VMStartError("QEMU did not finish loading the snapshot in time")
            await asyncio.sleep(0.002)
        if status not in ("paused", "postmigrate", "running"):
            raise VMStartError(f"restore ended in state {status!r}: {self.vmm_error()}")

    async def save_memory(self, dest: Path, timeout: float = 120.0) -> None:
        """Write the VM's device and memory state to ``dest`` (QMP migrate). A running VM
        is live-migrated and ends paused ("postmigrate"); ``resume`` continues it.

        QEMU may not open files or spawn programs (its seccomp filter): the file is
        opened here and handed over on the QMP socket (SCM_RIGHTS)."""
        await self._execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            async with self._qmp_lock:
                assert self._qmp is not None
                self._qmp.send_fd_scm(fd)
            await self._execute("getfd", {"fdname": "snapshot"})
        finally:
            os.close(fd)
        await self._execute("migrate", {"uri": "fd:snapshot"})
        deadline = time.monotonic() + timeout
        while True:
            info = await self._execute("query-migrate")
            status = info.get("status") if isinstance(info, dict) else None
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                detail = info.get("error-desc", "") if isinstance(info, dict) else ""
                raise ProviderError(f"saving the VM state failed ({status}): {detail}")
            await asyncio.sleep(0.005)

    async def query_status(self) -> str:
        reply = await self._execute("query-status")
        assert isinstance(reply, dict)
        return str(reply["status"])

    def vmm_error(self) -> str:
        try:
            return self.spec.paths.vmm_log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

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
        await asyncio.to_thread(self._finish)

    def _finish(self) -> None:
        self._proc.wait()
        if self.group is not None:
            self.group.remove()
        if self.network is not None:
            self.network.release()

    def killed_for_memory(self) -> bool:
        """Whether the kernel killed the VMM for going over its control group's memory."""
        return self.group is not None and self.group.oom_killed()


class QemuProvider:
    """Starts QEMU microVMs."""

    name = "qemu"

    def __init__(self, qemu: str | None = None, qemu_img: str | None = None) -> None:
        self._qemu = qemu
        self._qemu_img = qemu_img

    @property
    def qemu(self) -> str:
        return self._qemu or find_tool(QEMU_BINARY, "qemu-system-x86")

    @property
    def qemu_img(self) -> str:
        return self._qemu_img or find_tool(QEMU_IMG, "qemu-utils")

    def _overlay_seed(self, backing: Path, backing_format: str) -> Path:
        """An empty qcow2 overlay of ``backing``, made once with qemu-img and kept beside
        it; each sandbox's overlay is a copy (cheaper than running qemu-img each time)."""
        seed = backing.parent / f".{backing.name}.overlay-seed.qcow2"
        if not seed.is_file():
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

    async def start(self, spec: VMSpec) -> QemuVM:
        """Create the overlay and start QEMU (QMP is connected when first needed)."""
        paths = spec.paths
        admit(spec.machine.memory_mib, available_memory_mib(), reserve_mib())
        seed = self._overlay_seed(spec.rootfs, spec.rootfs_format)
        shutil.copyfile(seed, paths.overlay)
        if spec.confine is not None:
            make_jail(spec)
        disks = open_disks(spec)
        incoming = None
        group = None
        network = None
        proc: subprocess.Popen[bytes] | None = None
        guard_sock: socket.socket | None = None
        stage_sock: socket.socket | None = None
        try:
            network = Attachment.setup(spec)
            layout = cgroups.detect()
            if layout is not None:
                m = spec.machine
                group = VMMGroup.create(
                    layout, spec.vm_id, cgroups.limits_for(m.vcpus, m.memory_mib)
                )
            if spec.incoming:
                incoming = os.open(spec.incoming, os.O_RDONLY | os.O_CLOEXEC)
            tap_fd = network.tap_fd if network else None
            argv = build_argv(spec, disks, self.qemu, incoming_fd=incoming, tap_fd=tap_fd)
            log.debug("starting %s: %s", spec.vm_id, " ".join(argv))
            passed = inherited_fds(disks, incoming) + ((tap_fd,) if tap_fd is not None else ())
            if network is not None and network.guard_refuse is not None:
                guard_sock, stage_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                argv = netguard.stage_argv(sys.executable, stage_sock.fileno()) + argv
                passed += (stage_sock.fileno(),)
            if group is not None:
                argv = group.spawn_prefix() + argv
            with open(paths.vmm_log, "wb") as vmm_log:
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
                assert network is not None and stage_sock is not None
                stage_sock.close()
                stage_sock = None
                listener = await asyncio.to_thread(netguard.receive_listener, guard_sock, 30.0)
                network.start_guard(listener, asyncio.get_running_loop())
        except BaseException:
            if proc is not None and proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if group is not None:
                group.remove()
            if network is not None:
                network.release()
            raise
        finally:
            for sock in (guard_sock, stage_sock):
                if sock is not None:
                    sock.close()
            close_disks(disks)
            if network is not None:
                network.close_fd()
            if incoming is not None:
                os.close(incoming)
        limit_vmm(proc.pid, spec.machine.memory_mib)
        log.debug("%s: QEMU pid %d started", spec.vm_id, proc.pid)
        return QemuVM(spec, proc, group, network)
