"""QEMU's command line, as pure functions: a ``VMSpec`` (and the descriptors QEMU
inherits) in, an argv out. They touch no file and start nothing; unit tests check them.
The process I/O is ``qemu.py``.

The machine: ``-M microvm`` with a PVH-booted vmlinux, virtio-mmio devices, QMP control,
the agent on a virtio-serial port.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..guest.protocol import AGENT_PORT_NAME
from ..host.plan import Enforcement
from ..network import DETACHED, GATEWAY, GUEST_DNS, GUEST_NETWORK, guest_mac
from .base import VMSpec, drive_serial

QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
ROOT_SERIAL = "nsroot"
GUEST_INIT = "/opt/novasandbox/init"


def kernel_cmdline(spec: VMSpec, tsc_khz: int | None = None) -> str:
    """The guest kernel's command line. Under TCG the guest's TSC counts at the host's
    TSC rate; with ``tsc_khz`` (that rate) the guest skips calibrating it, which fails
    on a loaded host and then leaves the guest on the jiffies clock (4 ms resolution,
    a timer tick every 4 ms even when idle), in every sandbox restored from a template
    snapshot it booted."""
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
        if tsc_khz:
            args.append(f"tsc_early_khz={tsc_khz}")
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
    lower: tuple[tuple[int, str], ...] = ()
    """The images under the base, each with its format (``qcow2``, ``raw``), from the
    base's backing file down: a layered template's chain, a snapshot's template image.
    QEMU is told the whole chain, so it never opens a backing file by the name in an
    image's header (names that point into a cache that may have moved)."""


BASE_FDSET = 1
OVERLAY_FDSET = 2
LOWER_FDSET = 64
"""Fd set of the image ``i`` levels under the base: ``LOWER_FDSET + i``."""


def drive_fdset(index: int) -> int:
    return OVERLAY_FDSET + index


TCG_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
"""The guest's CPU under emulation: QEMU's ``qemu64`` (x86-64-v1) with what x86-64-v2
adds (SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B; LAHF/SAHF it has). Wheels built for v2
(numpy from 2.4 on) die of SIGILL on plain ``qemu64``."""


CPU_TAGS = {"host": "host", TCG_CPU: "x86-64-v2"}
"""How the engine names each guest CPU model (``QemuProvider.engine``: a snapshot made
with one does not restore with another)."""


def guest_cpu(accel: str) -> str:
    """The ``-cpu`` of a VM under ``accel``: the host's own CPU with KVM, else
    ``TCG_CPU``. Part of what a snapshot depends on (``Engine.cpu``)."""
    return "host" if accel == "kvm" else TCG_CPU


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
    tsc_khz: int | None = None,
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
        guest_cpu(spec.accel),
        "-smp",
        str(m.vcpus),
        "-m",
        f"{m.memory_mib}M",
        "-sandbox",
        seccomp_option(spec.host.confine is not None),
    ]
    confine = spec.host.confine
    if confine is not None:
        argv += [
            "-runas",
            f"{confine.uid}:{confine.gid}",
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
        kernel_cmdline(spec, tsc_khz),
        "-serial",
        f"file:{_opt(p.console_log)}",
        "-qmp",
        f"unix:{_opt(p.control_socket)},server=on,wait=off",
    ]
    sets = [(BASE_FDSET, disks.base), (OVERLAY_FDSET, disks.overlay)]
    sets += [(drive_fdset(i), fds) for i, fds in enumerate(disks.drives, start=1)]
    sets += [(LOWER_FDSET + i, (fd,)) for i, (fd, _) in enumerate(disks.lower, start=1)]
    for set_id, fds in sets:
        if not fds:
            raise ValueError(f"fd set {set_id} is empty")
        for fd in fds:
            argv += ["-add-fd", f"fd={fd},set={set_id}"]
    # the chain under the base, bottom first (a node's backing must exist before it)
    for level in range(len(disks.lower), 0, -1):
        fmt = disks.lower[level - 1][1]
        below = f",backing=base{level + 1}" if level < len(disks.lower) else ""
        argv += [
            "-blockdev",
            f"driver=file,node-name=base{level}-file,"
            f"filename=/dev/fdset/{LOWER_FDSET + level},read-only=on",
            "-blockdev",
            f"driver={fmt},node-name=base{level},file=base{level}-file,read-only=on{below}",
        ]
    base_backing = ",backing=base1" if disks.lower else ""
    argv += [
        # the root disk: a per-sandbox copy-on-write overlay; the template image (or a
        # snapshot's disk) is its read-only backing file and is never written
        "-blockdev",
        f"driver=file,node-name=base-file,filename=/dev/fdset/{BASE_FDSET},read-only=on",
        "-blockdev",
        f"driver={spec.rootfs_format},node-name=base,file=base-file,read-only=on{base_backing}",
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
    if spec.defer_incoming:
        argv += ["-incoming", "defer"]  # the snapshot comes later, over QMP
    elif incoming_fd is not None:
        argv += ["-incoming", f"fd:{incoming_fd}"]
    return argv


def network_argv(spec: VMSpec, tap_fd: int | None = None) -> list[str]:
    """The network device of a networked sandbox and its backend, as its host plan
    (``spec.host``) says. Pure.

    - "nat": QEMU's user-mode stack (slirp) on the fixed guest network, no IPv6, exposed
      ports forwarded from the host's loopback (``plan.host_ports``). slirp itself never
      restricts (its ``restrict=on`` would refuse silently): egress is decided by whom
      the plan names (``plan.enforcement``: nftables on the VMM's uid, or the guard).
    - "tap": the TAP whose descriptor QEMU inherits as ``tap_fd`` (``host/tap.py``).
    - "detached": the device with no backend (template snapshots for networked sandboxes).
    """
    plan = spec.host
    if plan.network == "none":
        return []
    device = f"virtio-net-device,mac={guest_mac(spec.vm_id)}"
    if plan.network == DETACHED:
        return ["-device", device]
    if plan.enforcement is Enforcement.NFT_TAP:
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
    for guest_port, host_port in sorted(plan.host_ports.items()):
        options.append(f"hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}")
    return ["-netdev", ",".join(options), "-device", device + ",netdev=net0"]


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
