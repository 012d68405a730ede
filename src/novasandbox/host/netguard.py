"""Egress policy without root: the kernel asks us before the VMM connects anywhere.

nftables needs root, and so does giving each VMM a uid to key rules on. Without root, a
"nat" sandbox's VMM is started with a seccomp filter that turns ``connect``, ``sendto``,
``sendmsg`` and ``sendmmsg`` into notifications (``SECCOMP_RET_USER_NOTIF``). The owner
process holds the filter's listener: for each call it reads the destination from the
VMM's memory (``/proc/PID/mem``), decides with ``network.egress_refusal`` (the same
policy the nftables chains implement) and lets the call go on or fails it with
``ECONNREFUSED``, telling ``on_refused`` which rule refused it (``refusals.py``). If
the owner is gone, the listener is closed and every such call fails (``ENOSYS``):
closed, not open.

How the filter gets there: QEMU is started through a small Python stage (``python3 -I
-S``) that installs the filter (no_new_privs first, as an unprivileged process must),
tells the owner, over an inherited socket, where the listener is (the owner copies it
with ``pidfd_getfd``: the stage cannot ``sendmsg`` it, that call is now filtered), and
execs QEMU once the owner has it. QEMU's own
seccomp filter stacks on top; a notification wins over its "allow".

Limits, stated plainly: the destination is read, checked, and then read again by the
kernel when the call goes on, so a thread of a *compromised* QEMU could change it in
between (the kernel documentation warns about this). It keeps what the guest asks its
user-mode stack to do within the policy; it does not contain a VMM the guest has taken
over. That is what root mode's per-VMM uid, chroot and nftables rules do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address

log = logging.getLogger("novasandbox.netguard")

SYS_CONNECT, SYS_SENDTO, SYS_SENDMSG, SYS_SENDMMSG = 42, 44, 46, 307
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
NOTIF = struct.Struct("<QIIiIQ6Q")  # struct seccomp_notif
NOTIF_RESP = struct.Struct("<QqiI")  # struct seccomp_notif_resp

PR_SET_NO_NEW_PRIVS = 38
SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 8
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: load a word of struct seccomp_data
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4  # offsets in struct seccomp_data
GUARDED_CALLS = (SYS_CONNECT, SYS_SENDTO, SYS_SENDMSG, SYS_SENDMMSG)


def filter_program() -> bytes:
    """The seccomp filter the stage installs (a ``struct sock_filter`` array): on x86_64
    only, no x32 calls, and the guarded calls go to the listener; everything else is
    allowed. Pure."""
    n = len(GUARDED_CALLS)
    prog = [
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        (BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        (BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        # each guarded call jumps over what is left of the list and the ALLOW
        *((BPF_JEQ_K, n - i, 0, nr) for i, nr in enumerate(GUARDED_CALLS)),
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in prog)


# The stage between fork and QEMU: argv[1] is the socket to send the listener on,
# argv[2] the filter (hex), the rest is QEMU's command line. Self-contained (ctypes
# only): it runs with -I -S; its numbers come from the constants above.
STAGE = rf"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
raw = bytes.fromhex(sys.argv[2])
buf = ctypes.create_string_buffer(raw)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Prog(len(raw) // 8, ctypes.addressof(buf))
if libc.prctl({PR_SET_NO_NEW_PRIVS}, 1, 0, 0, 0) != 0:
    sys.exit("netguard: no_new_privs: " + os.strerror(ctypes.get_errno()))
flags = {SECCOMP_FILTER_FLAG_NEW_LISTENER}
listener = libc.syscall({SYS_SECCOMP}, {SECCOMP_SET_MODE_FILTER}, flags, ctypes.byref(fprog))
if listener < 0:
    sys.exit("netguard: seccomp: " + os.strerror(ctypes.get_errno()))
# sendmsg would now wait for the very listener it carries: say where it is with a plain
# write instead, and let the owner take a copy (pidfd_getfd) before going on
sock = int(sys.argv[1])
os.write(sock, f"{{os.getpid()}} {{listener}}\n".encode())
if os.read(sock, 1) != b"K":
    sys.exit("netguard: the owner did not take the listener")
os.close(sock)
os.close(listener)
os.execv(sys.argv[3], sys.argv[3:])
"""


def stage_argv(python: str, sock_fd: int) -> list[str]:
    """The argv prefix that installs the filter, hands over its listener on ``sock_fd``
    and execs the rest."""
    return [python, "-I", "-S", "-c", STAGE, str(sock_fd), filter_program().hex()]


Refuse = Callable[[IPv4Address, int], str | None]
"""(address, port) -> the rule that refuses it (``network.REFUSAL_RULES``), or None."""
OnRefused = Callable[[str, str, int | None, str], None]
"""(protocol, address, port, rule code), for each refused call."""
Refused = tuple[str, IPv4Address | None, int]
"""(rule code, address, port) of a refused call."""


def parse_sockaddr(raw: bytes) -> tuple[int, IPv4Address | None, int]:
    """(family, IPv4 address or None, port) of a ``struct sockaddr``. Pure."""
    if len(raw) < 2:
        return -1, None, 0
    family = struct.unpack_from("H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return family, IPv4Address(raw[4:8]), port
    return family, None, 0


ALWAYS_ALLOWED_FAMILIES = (socket.AF_UNSPEC, socket.AF_UNIX, socket.AF_NETLINK)


def refusal(family: int, address: IPv4Address | None, port: int, refuse: Refuse) -> str | None:
    """The rule that refuses a call towards this destination; None: it may go on. Pure."""
    if family in ALWAYS_ALLOWED_FAMILIES:
        return None
    if family != socket.AF_INET or address is None:
        return "not-ipv4"  # IPv6 and anything else: the guest has none of it
    return refuse(address, port)


PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp"}


class Guard:
    """The owner's side of one VMM's filter: answers its notifications on an event
    loop until closed; ``on_refused`` hears of each call it refuses."""

    def __init__(self, listener: int, refuse: Refuse, on_refused: OnRefused | None = None) -> None:
        self.listener = listener
        self.refuse = refuse
        self.on_refused = on_refused
        self.denied = 0
        self.allowed = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.listener, self._on_readable)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.listener)
            self._loop = None
        if self.listener >= 0:
            with contextlib.suppress(OSError):
                os.close(self.listener)
            self.listener = -1

    def _on_readable(self) -> None:
        buf = bytearray(NOTIF.size)
        try:
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_RECV, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):  # the call went away
                return
            self.close()  # the VMM is gone
            return
        notif_id, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
        try:
            refused = self._refusal(pid, nr, args)
        except OSError:
            refused = ("unreadable", None, 0)
        if refused is None:
            self.allowed += 1
            resp = NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        else:
            self.denied += 1
            if self.on_refused is not None:
                code, address, port = refused
                protocol = self._protocol(pid, nr, args[0])  # while the call still waits
                self.on_refused(protocol, str(address or "?"), port or None, code)
            resp = NOTIF_RESP.pack(notif_id, 0, -errno.ECONNREFUSED, 0)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.listener, SECCOMP_IOCTL_NOTIF_SEND, resp)

    def _protocol(self, pid: int, nr: int, fd: int) -> str:
        """The protocol of the socket the call is on (a copy of it, asked with
        SO_PROTOCOL); if it cannot be had, what QEMU's user-mode stack uses the call for
        (connect: TCP, the send calls: UDP)."""
        guess = "tcp" if nr == SYS_CONNECT else "udp"
        try:
            with open(f"/proc/{pid}/status") as f:
                tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
            pidfd = _syscall(SYS_PIDFD_OPEN, tgid, 0)
            try:
                copy = _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
            finally:
                os.close(pidfd)
            with socket.socket(fileno=copy) as sock:
                number = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        except (OSError, StopIteration, ValueError):
            return guess
        return PROTOCOL_NAMES.get(number, str(number))

    def _read(self, pid: int, address: int, length: int) -> bytes:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            data = mem.read(length)
        return data

    def _sockaddr_refusal(self, pid: int, address: int, length: int) -> Refused | None:
        if address == 0:
            return None  # no destination: a connected socket, checked at connect
        raw = self._read(pid, address, min(max(length, 0), 128))
        family, ip, port = parse_sockaddr(raw)
        code = refusal(family, ip, port, self.refuse)
        return None if code is None else (code, ip, port)

    def _refusal(self, pid: int, nr: int, args: Sequence[int]) -> Refused | None:
        if nr == SYS_CONNECT:
            return self._sockaddr_refusal(pid, args[1], args[2])
        if nr == SYS_SENDTO:
            return self._sockaddr_refusal(pid, args[4], args[5])
        if nr == SYS_SENDMSG:
            return self._msghdr_refusal(pid, args[1])
        if nr == SYS_SENDMMSG:
            for i in range(min(args[2], 1024)):
                refused = self._msghdr_refusal(pid, args[1] + 64 * i)
                if refused is not None:
                    return refused
            return None
        return ("unreadable", None, 0)

    def _msghdr_refusal(self, pid: int, address: int) -> Refused | None:
        name, namelen = struct.unpack("<QI", self._read(pid, address, 12))
        return self._sockaddr_refusal(pid, name, namelen)


def receive_listener(sock: socket.socket, timeout: float) -> int:
    """Take a copy of the listener the stage announces (blocking, up to ``timeout``
    seconds): ``pidfd_open`` + ``pidfd_getfd`` on the stage, then let it go on."""
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise OSError(errno.EPROTO, "the VMM's start-up stage ended before its filter")
        line += chunk
    pid, fd = (int(x) for x in line.split())
    pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    try:
        listener = _syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    sock.sendall(b"K")
    return listener


SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: int) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result
