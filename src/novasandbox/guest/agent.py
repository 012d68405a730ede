#!/usr/bin/python3
"""NovaSandbox guest agent: runs inside the VM, as PID 1 or started by it. Standard library only.

As PID 1 it first does init's work (mount proc/sys/dev/devpts/tmp, bring up loopback),
then forks: the child serves the host over the virtio-serial port named
``org.novasandbox.agent``; PID 1 reaps every orphan, restarts the agent if it dies, and
powers the VM off cleanly once the agent asks to stop.

The agent speaks the frame protocol in ``protocol.py`` (copied beside this file in the
image). Requests are identified by id and handled concurrently: commands run in their
own process groups with their output streamed back in chunks; files move in chunks.

Outside a VM (``agent.py --stdio``) it serves one connection on stdin/stdout, which the
unit tests use to exercise the real agent without booting a kernel.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import os
import pwd
import queue
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

# Imports are kept to what start-up needs: each costs tens of ms under emulation, and
# typing/dataclasses/glob/shutil are not needed at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

try:
    from .protocol import (
        AGENT_PORT_NAME,
        CHUNK_SIZE,
        FRAME_COST,
        MAX_LIST_DEPTH,
        MAX_WATCHES,
        MESSAGE_BATCH,
        MESSAGE_WINDOW,
        PROTOCOL_VERSION,
        WINDOW,
        ErrorCode,
        Frame,
        FrameDecoder,
        Kind,
        ProtocolError,
        encode_frame,
        encode_message,
    )
except ImportError:  # run as a script inside the guest, with protocol.py beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from protocol import (  # type: ignore[no-redef,import-not-found]
        AGENT_PORT_NAME,
        CHUNK_SIZE,
        FRAME_COST,
        MAX_LIST_DEPTH,
        MAX_WATCHES,
        MESSAGE_BATCH,
        MESSAGE_WINDOW,
        PROTOCOL_VERSION,
        WINDOW,
        ErrorCode,
        Frame,
        FrameDecoder,
        Kind,
        ProtocolError,
        encode_frame,
        encode_message,
    )

AGENT_VERSION = "0.1.0"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OUTPUT_IDLE_GRACE = 0.2
"""After a command's leader exits, its output is read for as long as it keeps coming;
once both pipes have been quiet this long, the command is reported finished (background
children that inherited its pipes are not waited for; what they print later is read and
dropped, never sent under another request's id)."""

RECENT_OUTPUT = 64 * 1024
"""Bytes of a command's latest output (both streams) it keeps for a client that
connects to it later (``connect``), which gets them first."""
MAX_WATCHERS = 16
"""Connections (``connect``) one command streams to at once, besides its starter."""
MAX_TAG = 256
"""Characters of a command's tag (given at start, shown by ``ps``)."""

TEMPLATE_DEFAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "template.json")
"""The template's defaults for commands, written beside the agent when the image was built
(``Template.guest_defaults()``); absent outside an image."""
_MAX_TEMPLATE_DEFAULTS = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _log(msg: str, level: int = 6) -> None:
    """Log to the kernel ring buffer; levels 0-3 also reach the serial console (console.log)
    despite ``quiet``."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<{level}>novasandbox-agent: {msg}\n")
    except OSError:
        print(f"novasandbox-agent: {msg}", file=sys.stderr, flush=True)


def load_template_defaults(
    path: str = TEMPLATE_DEFAULTS,
) -> tuple[dict[str, str], str, str | None]:
    """The template's defaults for commands: their environment (e.g. a virtual
    environment first on PATH), the account they run as and their working directory
    (None: the account's home). Nothing, ``root`` and None when there is no such file
    (outside an image) or it is unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_TEMPLATE_DEFAULTS + 1)
        if len(data) > _MAX_TEMPLATE_DEFAULTS:
            raise ValueError("too large")
        defaults = json.loads(data)
        env = defaults.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in env.items()
        ):
            raise ValueError("env is not a table of strings")
        user = defaults.get("user", "root")
        if not isinstance(user, str) or not _valid_user_name(user):
            raise ValueError(f"invalid user {user!r}")
        workdir = defaults.get("workdir")
        if workdir is not None and not (
            isinstance(workdir, str) and workdir.startswith("/") and "\0" not in workdir
        ):
            raise ValueError(f"invalid workdir {workdir!r}")
    except FileNotFoundError:
        return {}, "root", None
    except (OSError, ValueError, AttributeError) as exc:
        # stderr: the console (console.log) in a guest; not the kernel log, which would
        # be the host's when the agent runs outside a VM (--stdio)
        print(f"novasandbox-agent: ignoring {path}: {exc}", file=sys.stderr, flush=True)
        return {}, "root", None
    return env, user, workdir


def load_template_env(path: str = TEMPLATE_DEFAULTS) -> dict[str, str]:
    """The template's default environment of commands (``load_template_defaults``)."""
    return load_template_defaults(path)[0]


def _valid_user_name(name: str) -> bool:
    """An account name as ``useradd`` accepts it by default (and nothing a path or a
    command line could misread): ``[a-z_][a-z0-9_-]*``, at most 32 characters."""
    return (
        0 < len(name) <= 32
        and (name[0].islower() or name[0] == "_")
        and all(c.islower() or c.isdigit() or c in "_-" for c in name)
        and name.isascii()
    )


TEMPLATE_ENV, TEMPLATE_USER, TEMPLATE_WORKDIR = load_template_defaults()


# ---------------------------------------------------------------------------- accounts


class _Account:
    """An account requests run as: its ids, supplementary groups, home and shell."""

    __slots__ = ("gid", "groups", "home", "name", "shell", "uid")

    def __init__(self, pw: pwd.struct_passwd) -> None:
        self.name = pw.pw_name
        self.uid = pw.pw_uid
        self.gid = pw.pw_gid
        self.groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        self.home = pw.pw_dir or "/"
        self.shell = pw.pw_shell or "/bin/sh"

    @property
    def is_self(self) -> bool:
        """The agent's own account (root in a guest): nothing to switch."""
        return self.uid == os.geteuid() and self.gid == os.getegid()


def _account(name: Any) -> _Account:
    """The account ``name`` (None: the template's default user) from the guest's own
    passwd, read at every request: accounts made in the sandbox count."""
    if name is None:
        name = TEMPLATE_USER
    if not isinstance(name, str) or not _valid_user_name(name):
        raise ValueError(f"user must be an account name, got {name!r}")
    try:
        return _Account(pwd.getpwnam(name))
    except KeyError:
        raise _Refused(ErrorCode.UNKNOWN_USER, f"no user {name!r} in the sandbox") from None


_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setresuid": 117, "setresgid": 119},
    "aarch64": {"setgroups": 159, "setresuid": 147, "setresgid": 149},
}.get(os.uname().machine, {})
"""Numbers of the system calls that change the calling thread's ids. They are made
directly: glibc's wrappers change the ids of every thread of the process (the kernel's
change only the caller's, which is what a request needs)."""


def _syscall(name: str, *args: int | ctypes.Array[ctypes.c_uint]) -> None:
    number = _SYSCALLS.get(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name} on {os.uname().machine}")
    if _libc.syscall(number, *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _setgroups(groups: list[int]) -> None:
    _syscall("setgroups", len(groups), (ctypes.c_uint * max(len(groups), 1))(*groups))


class _SpawningAs:
    """Commands this thread starts run as ``account``. The thread itself takes the
    account's ids (real and effective uid and gid, groups; the saved uid stays the
    agent's, so it can change back) just around the spawn, so the child, which inherits
    them, needs no change of its own and CPython can start it with vfork: a fork of the
    agent (what ``Popen(user=...)`` does) costs about 20 ms more per command under
    emulation. Where the thread's ids cannot be changed directly (an architecture not in
    ``_SYSCALLS``), ``popen_ids`` has ``Popen``'s own arguments instead."""

    def __init__(self, account: _Account) -> None:
        self.account = account
        self.popen_ids: dict[str, Any] = {}
        if not account.is_self and not _SYSCALLS:
            self.popen_ids = {
                "user": account.uid,
                "group": account.gid,
                "extra_groups": account.groups,
            }
        self._saved: tuple[tuple[int, int, int], tuple[int, int, int], list[int]] | None = None

    def __enter__(self) -> _SpawningAs:
        acc = self.account
        if acc.is_self or self.popen_ids:
            return self
        uids, gids = os.getresuid(), os.getresgid()
        self._saved = (uids, gids, os.getgroups())
        try:
            _setgroups(acc.groups)
            _syscall("setresgid", acc.gid, acc.gid, acc.gid)
            _syscall("setresuid", acc.uid, acc.uid, uids[2])
        except OSError:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._saved is None:
            return
        uids, gids, groups = self._saved
        self._saved = None
        _syscall("setresuid", *uids)  # first: the powers to change the rest come back
        _syscall("setresgid", *gids)
        _setgroups(groups)


class _ActingAs:
    """File operations of this thread as ``account``: the thread's file-system uid and gid
    and its groups become the account's (all three are per thread in Linux), so the
    guest's permissions apply and what it creates is the account's. The kernel drops
    root's powers over files (CAP_DAC_OVERRIDE, CAP_FOWNER, ...) while the fsuid is not 0
    and gives them back when it is 0 again. Restored on the way out, whatever happens."""

    def __init__(self, account: _Account) -> None:
        self._account = account
        self._saved: list[int] | None = None

    def __enter__(self) -> _ActingAs:
        acc = self._account
        if acc.is_self:
            return self
        self._saved = os.getgroups()
        try:
            _setgroups(acc.groups)
            _libc.setfsgid(acc.gid)
            _libc.setfsuid(acc.uid)
            if _libc.setfsuid(-1) != acc.uid or _libc.setfsgid(-1) != acc.gid:
                raise OSError(errno.EPERM, f"cannot act as {acc.name}")
        except OSError:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self._restore()

    def _restore(self) -> None:
        _libc.setfsuid(os.geteuid())
        _libc.setfsgid(os.getegid())
        if self._saved is not None:
            _setgroups(self._saved)
            self._saved = None


def _acting(msg: dict[str, Any]) -> _ActingAs:
    return _ActingAs(_account(msg.get("user")))


# ---------------------------------------------------------------------------- init duties


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if (
        _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None)
        != 0
    ):
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def init_system() -> None:
    """Mount the pseudo file systems and bring up loopback (PID 1 only)."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755")
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    _mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for link, target in (
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ):
        if not os.path.lexists(link):
            os.symlink(target, link)
    try:
        _interface_up("lo")
    except OSError as exc:
        _log(f"loopback not up: {exc}")


SIOCADDRT, SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFHWADDR = 0x890B, 0x8916, 0x891C, 0x8924
RTF_UP, RTF_GATEWAY, ARPHRD_ETHER = 0x1, 0x2, 1


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def configure_network(net: dict[str, Any]) -> str:
    """Give the guest's network device the host's settings: MAC, address, netmask, default
    route and resolver. Idempotent: a restored guest already has the snapshot's (and its
    old MAC, which this replaces). Returns the interface's name."""
    names: list[str] = []
    deadline = time.monotonic() + 5
    while not names and time.monotonic() < deadline:
        names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
        if not names:
            time.sleep(0.02)
    if not names:
        raise OSError(errno.ENODEV, "no network device")
    name = names[0].encode()
    mac = bytes.fromhex(str(net["mac"]).replace(":", ""))
    prefix = int(net["prefix"])
    netmask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFHWADDR, struct.pack("16sH14s", name, ARPHRD_ETHER, mac))
        fcntl.ioctl(sock, SIOCSIFADDR, struct.pack("16s", name) + _sockaddr_in(net["address"]))
        fcntl.ioctl(sock, SIOCSIFNETMASK, struct.pack("16s", name) + _sockaddr_in(netmask))
        _interface_up(name.decode())
        # struct rtentry (x86_64): dst, gateway, genmask, flags, ..., dev; 120 bytes
        route = struct.pack(
            "L16s16s16sHhLPhPLLH",
            0,
            _sockaddr_in("0.0.0.0"),
            _sockaddr_in(net["gateway"]),
            _sockaddr_in("0.0.0.0"),
            RTF_UP | RTF_GATEWAY,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ).ljust(120, b"\0")
        try:
            fcntl.ioctl(sock, SIOCADDRT, route)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    with open("/etc/resolv.conf", "w") as f:
        f.write(f"nameserver {net['dns']}\n" if net.get("dns") else "# no DNS (no egress)\n")
    return name.decode()


def _interface_up(name: str) -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sh", name.encode(), 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, siocgifflags, req))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh", name.encode(), flags | iff_up))


def _name_in_hosts(hostname: str, path: str = "/etc/hosts") -> None:
    """Map the hostname to 127.0.1.1 in /etc/hosts, as Debian does, so that what looks
    itself up (sudo, for one) finds it. Only that line is replaced; the file is written
    only when it changes."""
    if not 0 < len(hostname) <= 64 or not all(c.isalnum() or c in ".-" for c in hostname):
        raise ValueError(f"invalid hostname {hostname!r}")
    try:
        with open(path) as f:
            old = f.read(1 << 20)
    except FileNotFoundError:
        old = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
    lines = [line for line in old.splitlines() if not line.startswith("127.0.1.1")]
    new = "\n".join([*lines, f"127.0.1.1\t{hostname}"]) + "\n"
    if new != old:
        with open(path, "w") as f:
            f.write(new)


MAX_TERMINAL_COLS, MAX_TERMINAL_ROWS = 1000, 1000


def _terminal_size(msg: Any) -> tuple[int, int]:
    """``cols`` and ``rows`` of a message: integers from 1 to 1000."""
    if not isinstance(msg, dict):
        raise ValueError("pty must be an object with cols and rows")
    cols, rows = msg.get("cols"), msg.get("rows")
    for name, value, top in (("cols", cols, MAX_TERMINAL_COLS), ("rows", rows, MAX_TERMINAL_ROWS)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise ValueError(f"{name} must be an integer from 1 to {top}")
    return cols, rows  # type: ignore[return-value]


def _set_terminal_size(fd: int, cols: int, rows: int) -> None:
    import termios  # only for terminals: keeps the agent's start-up imports small

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> Callable[[], None]:
    """For ``Popen(preexec_fn=...)``: the child, leader of its new session, makes the
    terminal on its stdin its controlling terminal (job control, Ctrl-C, SIGWINCH)."""
    import termios

    request = termios.TIOCSCTTY

    def take() -> None:
        fcntl.ioctl(0, request, 0)

    return take


def _set_clock(epoch_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, epoch_ns)


def power_off() -> None:
    """End the VM. microvm runs without ACPI, so there is no power-off device: a reboot
    (triple fault, ``reboot=t``) ends QEMU, which runs with ``-no-reboot``."""
    os.sync()
    _libc.reboot(0x01234567)  # LINUX_REBOOT_CMD_RESTART
    time.sleep(5)
    os._exit(1)


_IN_VM = False
"""True in the guest (set by init before it forks the agent): only then does the agent
touch the clock, the hostname, the RNG or power. Never true under ``--stdio``."""


def run_as_init() -> None:
    """PID 1: set up the system, run the agent in a child, reap orphans, power off at the end."""
    global _IN_VM
    _IN_VM = True
    try:
        init_system()
    except OSError as exc:
        _log(f"init failed: {exc}", 3)
    restarts = 0
    while True:
        child = os.fork()
        if child == 0:
            try:
                code = serve_port()
            except BaseException as exc:
                _log(f"agent crashed: {exc!r}", 3)
                code = 1
            os._exit(code)
        while True:
            pid, status = os.wait()
            if pid == child:
                break
        if os.waitstatus_to_exitcode(status) == 0:
            power_off()
        restarts += 1
        _log(f"agent exited with status {status}; restarting ({restarts})", 3)
        time.sleep(min(2.0, 0.1 * restarts))


# ---------------------------------------------------------------------------- transport


def _sys_files(directory: str, name: str) -> list[str]:
    """``directory/*/name`` without glob (which would pull in fnmatch and more)."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    return [p for e in entries if os.path.exists(p := f"{directory}/{e}/{name}")]


def find_agent_port(timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for name_file in _sys_files("/sys/class/virtio-ports", "name"):
            try:
                with open(name_file) as f:
                    if f.read().strip() == AGENT_PORT_NAME:
                        dev = "/dev/" + os.path.basename(os.path.dirname(name_file))
                        if os.path.exists(dev):
                            return dev
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio port {AGENT_PORT_NAME} not found")
        time.sleep(0.01)


def default_signals() -> None:
    """What the agent's commands inherit: every signal at its default. PID 1 ignores
    SIGTERM and forks the agent without an exec; a shell that started ``--stdio`` in the
    background ignores SIGINT and SIGQUIT. An ignored signal stays ignored across exec,
    so without this ``kill PID`` and Ctrl-C in a terminal would do nothing to them."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_DFL in a child
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def serve_port() -> int:
    default_signals()
    path = find_agent_port()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    _log(f"serving on {path}")
    agent = Agent(fd, fd, reconnecting=True)
    if _IN_VM:
        _LIFETIME.start()
    # Unsolicited, on the connection's own id 0: a host that already spoke to an earlier
    # agent learns that its requests in flight are lost (the host ignores it otherwise).
    agent.send(encode_message(0, "agent-started", pid=os.getpid()))
    return agent.serve()


class Agent:
    """Serves requests from one byte stream (the virtio port, or stdio in tests)."""

    def __init__(self, rfd: int, wfd: int, *, reconnecting: bool = False) -> None:
        self._rfd = rfd
        self._wfd = wfd
        self._reconnecting = reconnecting
        self._wlock = threading.Lock()
        self._decoder = FrameDecoder()
        self._execs: dict[int, _Exec] = {}
        """Every running command, by a key of its own (request ids repeat: a new host
        connection, after a restore or an adoption, counts its requests from 1 again)."""
        self._exec_of_request: dict[int, int] = {}
        """The current host connection's requests that started a command: their keys."""
        self._exec_keys = itertools.count(1)
        self.session = 0
        """Which host connection this is (each ``hello`` starts one): a command started
        under an earlier one streams nothing and replies nothing to the new host (its
        request ids mean other requests now); it stays reachable by pid."""
        self._uploads: dict[int, _Upload] = {}
        self._stdin_queues: dict[int, queue.Queue[bytes]] = {}
        self._credits: dict[int, _Credit] = {}
        self._lock = threading.Lock()
        self._stop = False

    # --- output

    def send(self, frame: bytes) -> None:
        with self._wlock:
            view = memoryview(frame)
            while view:
                try:
                    n = os.write(self._wfd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EAGAIN:
                        time.sleep(0.001)
                        continue
                    raise
                view = view[n:]

    def reply(self, rid: int, op: str, **fields: Any) -> None:
        self.send(encode_message(rid, op, **fields))

    def forget_credit(self, rid: int, credit: _Credit) -> None:
        """Request ``rid`` streams no more: its acks and cancel have nothing to reach.
        Only that request's ``credit``: after a new host connected, ``rid`` may be one of
        its requests (``_new_session``)."""
        with self._lock:
            if self._credits.get(rid) is credit:
                del self._credits[rid]

    def reply_error(
        self,
        rid: int,
        exc: BaseException | None = None,
        *,
        code: ErrorCode | None = None,
        message: str | None = None,
    ) -> None:
        err = exc.errno if isinstance(exc, OSError) else None
        self.reply(
            rid,
            "error",
            code=code or _error_code(exc),
            errno=err,
            message=message or (_describe(exc) if exc else "error"),
        )

    # --- input

    def serve(self) -> int:
        idle_polls = 0
        while not self._stop:
            try:
                data = os.read(self._rfd, 1 << 16)
            except InterruptedError:
                continue
            if not data:
                if not self._reconnecting:
                    return 0
                # The host end is closed (or this VM was just restored from a snapshot):
                # poll until it comes back with a fresh stream, quickly at first. Nobody
                # reads the streams of the old one any more.
                self._decoder = FrameDecoder()
                for credit in list(self._credits.values()):
                    credit.cancel()
                idle_polls += 1
                time.sleep(0.002 if idle_polls < 500 else 0.05)
                continue
            idle_polls = 0
            try:
                frames = self._decoder.feed(data)
            except ProtocolError as exc:
                _log(f"protocol error, resetting stream: {exc}", 3)
                self._decoder = FrameDecoder()
                continue
            for frame in frames:
                try:
                    self.dispatch(frame)
                except ProtocolError as exc:
                    self.reply_error(
                        frame.request_id, code=ErrorCode.PROTOCOL_ERROR, message=str(exc)
                    )
        return 0

    def dispatch(self, frame: Frame) -> None:
        rid = frame.request_id
        if frame.kind is Kind.STDIN:
            stdin_queue = self._stdin_queues.get(rid)
            if stdin_queue is not None:
                stdin_queue.put(frame.payload)
            return
        if frame.kind is Kind.DATA:
            up = self._uploads.get(rid)
            if up is not None:
                up.write(frame.payload)
            return
        if frame.kind is not Kind.MSG:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from host")
        msg = frame.message()
        op = msg["op"]
        handler = self._HANDLERS.get(op)
        if handler is None:
            self.reply_error(rid, code=ErrorCode.UNKNOWN_OP, message=f"unknown operation {op!r}")
            return
        name, threaded = handler
        if op == "exec":
            # Registered before the thread starts: stdin frames may follow at once.
            self._stdin_queues[rid] = queue.Queue()
        if op in ("exec", "read_file", "connect"):
            self._credits[rid] = _Credit()
        if op in ("list", "watch_dir"):  # streamed messages: the window counts them
            self._credits[rid] = _Credit(MESSAGE_WINDOW)
        fn: Callable[[int, dict[str, Any]], None] = getattr(self, name)
        if threaded:
            threading.Thread(target=self._guarded, args=(fn, rid, msg), daemon=True).start()
        else:
            self._guarded(fn, rid, msg)

    def _guarded(
        self, fn: Callable[[int, dict[str, Any]], None], rid: int, msg: dict[str, Any]
    ) -> None:
        try:
            fn(rid, msg)
        except _Refused as exc:
            self.reply_error(rid, code=exc.code, message=str(exc))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.reply_error(rid, code=ErrorCode.BAD_REQUEST, message=f"bad request: {exc!r}")
        except OSError as exc:
            self.reply_error(rid, exc)
        except Exception as exc:
            self.reply_error(rid, code=ErrorCode.AGENT_ERROR, message=f"agent error: {exc!r}")

    # --- handlers (name, run in a thread?)

    _HANDLERS: dict[str, tuple[str, bool]] = {
        "hello": ("op_hello", False),
        "ping": ("op_ping", False),
        "metrics": ("op_metrics", True),
        "ack": ("op_ack", False),
        "cancel": ("op_cancel", False),
        "exec": ("op_exec", True),
        "signal": ("op_signal", False),
        "ps": ("op_ps", False),
        "resize": ("op_resize", False),
        "connect": ("op_connect", False),
        "write_stdin": ("op_write_stdin", False),
        "close_stdin": ("op_close_stdin", False),
        "write_file": ("op_write_file", False),
        "end": ("op_end", False),
        "read_file": ("op_read_file", True),
        "list": ("op_list", True),
        "stat": ("op_stat", False),
        "rename": ("op_rename", False),
        "watch_dir": ("op_watch_dir", True),
        "mkdir": ("op_mkdir", False),
        "remove": ("op_remove", True),
        "mount": ("op_mount", True),
        "release": ("op_release", True),
        "sync": ("op_sync", False),
        "freeze": ("op_freeze", False),
        "lifetime": ("op_lifetime", False),
        "thaw": ("op_thaw", False),
        "shutdown": ("op_shutdown", False),
    }

    def op_hello(self, rid: int, msg: dict[str, Any]) -> None:
        version = msg.get("version")
        if version != PROTOCOL_VERSION:
            self.reply_error(
                rid,
                code=ErrorCode.VERSION_MISMATCH,
                message=f"agent speaks protocol {PROTOCOL_VERSION}, host {version}",
            )
            return
        t_in = time.monotonic_ns()
        self._new_session()
        if _IN_VM:
            if msg.get("thaw"):  # first: what follows may write to the root file system
                try:
                    _thaw("/")
                except OSError as exc:
                    _log(f"cannot thaw /: {exc}", 3)
            if isinstance(msg.get("time_ns"), int):
                try:
                    _set_clock(msg["time_ns"])
                except OSError as exc:
                    _log(f"cannot set clock: {exc}")
            if isinstance(msg.get("hostname"), str):
                try:
                    socket.sethostname(msg["hostname"])
                    _name_in_hosts(msg["hostname"])
                except (OSError, ValueError) as exc:
                    _log(f"cannot set hostname: {exc}")
            if isinstance(msg.get("entropy"), str):
                try:
                    _reseed_rng(bytes.fromhex(msg["entropy"]))
                except (OSError, ValueError) as exc:
                    _log(f"cannot reseed the RNG: {exc}", 3)
            if "lifetime_s" in msg:
                _LIFETIME.set(msg["lifetime_s"])
            if isinstance(msg.get("net"), dict):
                try:
                    configure_network(msg["net"])
                except (OSError, KeyError, ValueError, struct.error) as exc:
                    self.reply_error(
                        rid,
                        code=ErrorCode.NETWORK_ERROR,
                        message=f"cannot configure the network: {exc}",
                    )
                    return
        self.reply(
            rid,
            "hello",
            version=PROTOCOL_VERSION,
            agent=AGENT_VERSION,
            kernel=os.uname().release,
            pid=os.getpid(),
            user=TEMPLATE_USER,
            hello_us=(time.monotonic_ns() - t_in) // 1000,
        )

    def _new_session(self) -> None:
        """A host connected (``hello``): what the requests of earlier connections still
        stream goes nowhere, and their ids are free for the new host's requests."""
        with self._lock:
            self.session += 1
            self._exec_of_request.clear()
            credits = list(self._credits.values())
            self._credits.clear()
        for credit in credits:
            credit.cancel()

    def op_ping(self, rid: int, msg: dict[str, Any]) -> None:
        self.reply(rid, "pong")

    def op_metrics(self, rid: int, msg: dict[str, Any]) -> None:
        """The guest's resource use (``_metrics``); threaded: it may sample the CPU for up
        to ``_CPU_WINDOW_MIN`` seconds."""
        self.reply(rid, "ok", **_metrics())

    def op_ack(self, rid: int, msg: dict[str, Any]) -> None:
        """The host consumed ``bytes`` of request ``rid``'s stream: it may send that many
        more. No reply (there is one per MiB of output)."""
        n = msg["bytes"]
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError("bytes must be a positive integer")
        credit = self._credits.get(rid)
        if credit is not None:
            credit.grant(n)

    def op_cancel(self, rid: int, msg: dict[str, Any]) -> None:
        """The host no longer reads request ``rid``'s stream: stop sending it (a command
        keeps running; its output is drained and dropped). No reply."""
        credit = self._credits.get(rid)
        if credit is not None:
            credit.cancel()

    def op_shutdown(self, rid: int, msg: dict[str, Any]) -> None:
        self.reply(rid, "ok")
        self._stop = True
        with self._lock:
            execs = list(self._execs.values())
        for ex in execs:
            ex.kill(signal.SIGKILL)

    # commands

    def op_exec(self, rid: int, msg: dict[str, Any]) -> None:
        stdin_queue, credit = self._stdin_queues[rid], self._credits[rid]
        try:
            self._exec(rid, msg, stdin_queue, credit)
        finally:
            with self._lock:
                if self._stdin_queues.get(rid) is stdin_queue:
                    del self._stdin_queues[rid]
            self.forget_credit(rid, credit)

    def _exec(
        self, rid: int, msg: dict[str, Any], stdin_queue: queue.Queue[bytes], credit: _Credit
    ) -> None:
        argv = msg["argv"]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        acc = _account(msg.get("user"))
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": acc.home,
            "LANG": "C.UTF-8",
            "USER": acc.name,
            "LOGNAME": acc.name,
            "SHELL": acc.shell,
        }
        env.update(TEMPLATE_ENV)  # the template's defaults, under the sandbox's and the call's
        env.update({str(k): str(v) for k, v in (msg.get("env") or {}).items()})
        if argv[1:2] in (["-l"], ["--login"]):
            if _IN_VM:
                # A login shell's /etc/profile sets PATH anew; the template's profile
                # script (/etc/profile.d/novasandbox.sh) puts this one back.
                env["NOVASANDBOX_PATH"] = env["PATH"]
            else:
                # Outside a VM (--stdio, the in-process provider) the "guest" is this
                # host: a login shell would run its account's own profile (anything at
                # all, a pyenv rehash waiting on a lock for one). A plain shell runs.
                argv = [argv[0], *argv[2:]]
        cwd = msg.get("cwd") or TEMPLATE_WORKDIR or (acc.home if os.path.isdir(acc.home) else "/")
        if not os.path.isdir(cwd):
            self.reply_error(
                rid, code=ErrorCode.INVALID_CWD, message=f"working directory {cwd!r} does not exist"
            )
            return
        timeout = msg.get("timeout")
        with_stdin = bool(msg.get("stdin"))
        tag = msg.get("tag")
        if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG):
            raise ValueError(f"tag must be a string of at most {MAX_TAG} characters")
        size = msg.get("pty")
        terminal: int | None = None
        io: dict[str, Any] = {
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "stdin": subprocess.PIPE if with_stdin else subprocess.DEVNULL,
        }
        if size is not None:
            cols, rows = _terminal_size(size)
            terminal, follower = os.openpty()
            _set_terminal_size(terminal, cols, rows)
            env.setdefault("TERM", "xterm-256color")
            with_stdin = True
            io = {
                "stdin": follower,
                "stdout": follower,
                "stderr": follower,
                "preexec_fn": _take_terminal(),
            }
        spawning = _SpawningAs(acc)
        try:
            with spawning:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    close_fds=True,
                    **io,
                    **spawning.popen_ids,
                )
        except (FileNotFoundError, PermissionError) as exc:
            if terminal is not None:
                os.close(terminal)
            self._spawn_refused(rid, exc, argv, cwd, acc)
            return
        except BaseException:
            if terminal is not None:
                os.close(terminal)
            raise
        finally:
            if terminal is not None:
                os.close(io["stdin"])  # the child's end: it has its own copies now
        info = {
            "pid": proc.pid,
            "argv": argv,
            "cwd": cwd,
            "user": acc.name,
            "tag": tag,
            "stdin": with_stdin,
            "started_at": time.time(),
        }
        ex = _Exec(proc, stdin_queue, credit, info, terminal)
        with self._lock:
            key = next(self._exec_keys)
            ex.session = self.session
            self._execs[key] = ex
            self._exec_of_request[rid] = key
        try:
            self.reply(rid, "started", pid=proc.pid)
            ex.run(self, rid, timeout if isinstance(timeout, (int, float)) else None)
        finally:
            with self._lock:
                self._execs.pop(key, None)
                if self._exec_of_request.get(rid) == key:
                    del self._exec_of_request[rid]

    def _spawn_refused(
        self, rid: int, exc: OSError, argv: list[str], cwd: str, acc: _Account
    ) -> None:
        if isinstance(exc, FileNotFoundError):
            self.reply_error(
                rid, code=ErrorCode.COMMAND_NOT_FOUND, message=f"command not found: {argv[0]}"
            )
        elif exc.filename == cwd:  # the child could not enter it as this user
            self.reply_error(
                rid,
                code=ErrorCode.INVALID_CWD,
                message=f"user {acc.name} may not enter the working directory {cwd!r}",
            )
        else:
            self.reply_error(
                rid, code=ErrorCode.PERMISSION_DENIED, message=f"permission denied: {argv[0]}"
            )

    def op_resize(self, rid: int, msg: dict[str, Any]) -> None:
        """A new window size for a command started with a terminal (``pty``), by pid;
        its foreground process group gets SIGWINCH from the kernel."""
        cols, rows = _terminal_size(msg)
        ex = self._by_pid(msg["pid"])
        if ex.terminal is None:
            raise _Refused(ErrorCode.NOT_A_TERMINAL, f"command {ex.proc.pid} has no terminal")
        with ex.terminal_lock:
            if ex.terminal < 0:
                raise _Refused(ErrorCode.NO_SUCH_PROCESS, f"command {ex.proc.pid} has ended")
            _set_terminal_size(ex.terminal, cols, rows)
        self.reply(rid, "ok")

    def op_signal(self, rid: int, msg: dict[str, Any]) -> None:
        """Signal a command's process group: by its request (``target``) or by its pid."""
        sig = msg["signal"]
        if not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64:
            raise ValueError("signal must be a signal number from 1 to 64")
        if "pid" in msg:
            self._by_pid(msg["pid"]).kill(sig)
            self.reply(rid, "ok")
            return
        target = int(msg["target"])
        with self._lock:
            key = self._exec_of_request.get(target)
            ex = self._execs.get(key) if key is not None else None
        if ex is None:
            raise _Refused(ErrorCode.NO_SUCH_PROCESS, f"no running command {target}")
        ex.kill(sig)
        self.reply(rid, "ok")

    def _by_pid(self, pid: Any) -> _Exec:
        """The running command started through the agent whose leader has ``pid``."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError("pid must be a positive integer")
        with self._lock:
            for ex in self._execs.values():
                if ex.proc.pid == pid and not ex.finished:
                    return ex
        raise _Refused(ErrorCode.NO_SUCH_PROCESS, f"no running command with pid {pid}")

    def op_ps(self, rid: int, msg: dict[str, Any]) -> None:
        """The commands started through the agent that still run."""
        with self._lock:
            running = [ex.info for ex in self._execs.values() if not ex.finished]
        running.sort(key=lambda info: info["pid"])
        self.reply(rid, "ok", processes=running)

    def op_connect(self, rid: int, msg: dict[str, Any]) -> None:
        """Stream a running command's output to this request too: ``started`` (its
        pid and argv), what it printed last (up to ``RECENT_OUTPUT``), then its output as
        it comes, then ``exit``. The command's own stream is not slowed by this one: what
        this one's window cannot take is dropped and counted (``dropped`` in ``exit``)."""
        credit = self._credits[rid]
        try:
            ex = self._by_pid(msg["pid"])
            ex.watch(self, rid, credit)
        except BaseException:
            self.forget_credit(rid, credit)
            raise

    def op_write_stdin(self, rid: int, msg: dict[str, Any]) -> None:
        """Data (``data``, latin-1 text of the bytes) for a running command's stdin, by pid."""
        data = msg["data"]
        if not isinstance(data, str):
            raise ValueError("data must be a string")
        ex = self._by_pid(msg["pid"])
        ex.feed(data.encode("latin-1"))
        self.reply(rid, "ok")

    def op_close_stdin(self, rid: int, msg: dict[str, Any]) -> None:
        self._by_pid(msg["pid"]).feed(b"")
        self.reply(rid, "ok")

    # files

    def op_write_file(self, rid: int, msg: dict[str, Any]) -> None:
        path = _guest_path(msg["path"])
        with _acting(msg):
            if msg.get("parents"):
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                except OSError:
                    pass  # reported by the open below
            previous = self._uploads.pop(rid, None)
            if previous is not None:
                previous.close()
            self._uploads[rid] = _Upload(path, bool(msg.get("append")), msg.get("mode"))

    def op_end(self, rid: int, msg: dict[str, Any]) -> None:
        up = self._uploads.pop(rid, None)
        if up is None:
            self.reply_error(rid, code=ErrorCode.BAD_REQUEST, message="no upload in progress")
            return
        err = up.close()
        if err is not None:
            self.reply_error(rid, err)
        else:
            self.reply(rid, "ok", size=up.size, stat=up.stat)

    def op_read_file(self, rid: int, msg: dict[str, Any]) -> None:
        credit = self._credits[rid]
        try:
            with _acting(msg):  # its own thread: only the open needs it, the rest is reads
                self._read_file(rid, msg, credit)
        finally:
            self.forget_credit(rid, credit)

    def _read_file(self, rid: int, msg: dict[str, Any], credit: _Credit) -> None:
        """Stream a regular file in DATA frames, at most ``max_size`` bytes (null: no
        limit). Anything else (a device, FIFO or socket, even behind a symlink) is refused
        before it is opened for reading, and checked again once open."""
        path = _guest_path(msg["path"])
        limit = msg.get("max_size")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ValueError("max_size must be an integer or null")
        _require_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        size = 0
        try:
            st = os.fstat(fd)
            _require_regular(path, st.st_mode)
            if limit is not None and st.st_size > limit:
                self.reply_error(
                    rid,
                    code=ErrorCode.FILE_TOO_LARGE,
                    message=f"{path} is {st.st_size} bytes, over the {limit}-byte limit",
                )
                return
            while chunk := os.read(fd, CHUNK_SIZE):
                size += len(chunk)
                if limit is not None and size > limit:
                    self.reply_error(
                        rid,
                        code=ErrorCode.FILE_TOO_LARGE,
                        message=f"{path} grew past the {limit}-byte limit while it was read",
                    )
                    return
                if not credit.take(len(chunk) + FRAME_COST):
                    return  # the host gave up on this read
                self.send(encode_frame(rid, Kind.DATA, chunk))
        finally:
            os.close(fd)
        self.reply(rid, "ok", size=size)

    def op_list(self, rid: int, msg: dict[str, Any]) -> None:
        credit = self._credits[rid]
        try:
            with _acting(msg):
                self._list(rid, msg, credit)
        finally:
            self.forget_credit(rid, credit)

    def _list(self, rid: int, msg: dict[str, Any], credit: _Credit) -> None:
        """The entries of a directory and, to ``depth`` levels, of its subdirectories
        (not through symlinks), in ``entries`` batches of about ``MESSAGE_BATCH`` bytes,
        then ``ok`` with their count. At most ``max_entries`` are sent: with more there,
        the reply says ``truncated``. Only the directory itself must be readable: a
        subdirectory that cannot be read is listed, not entered."""
        path = _guest_path(msg["path"])
        depth = msg.get("depth", 1)
        if (
            not isinstance(depth, int)
            or isinstance(depth, bool)
            or not 1 <= depth <= MAX_LIST_DEPTH
        ):
            raise ValueError(f"depth must be an integer from 1 to {MAX_LIST_DEPTH}")
        limit = msg.get("max_entries")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ValueError("max_entries must be a positive integer or null")
        names: dict[tuple[str, int], str] = {}
        batch: list[dict[str, Any]] = []
        held = count = 0
        todo = [(path, 1)]
        first = True
        while todo:
            where, level = todo.pop()
            try:
                with os.scandir(where) as it:
                    found = list(it)
            except OSError:
                if first:
                    raise  # the directory asked for: its error is the reply
                continue
            first = False
            found.sort(key=lambda e: e.name)
            subdirs = []
            for entry in found:
                try:
                    st = entry.stat(follow_symlinks=False)
                    item = _stat_dict(entry.path, st, names)
                except OSError:
                    continue
                if limit is not None and count >= limit:
                    self._send_batch(rid, credit, batch)
                    self.reply(rid, "ok", count=count, truncated=True)
                    return
                count += 1
                batch.append(item)
                held += len(item["path"]) + len(item["symlink_target"] or "") + 160
                if held >= MESSAGE_BATCH:
                    if not self._send_batch(rid, credit, batch):
                        return
                    batch, held = [], 0
                if level < depth and stat.S_ISDIR(st.st_mode):
                    subdirs.append((entry.path, level + 1))
            todo.extend(reversed(subdirs))  # popped in name order
        if batch and not self._send_batch(rid, credit, batch):
            return
        self.reply(rid, "ok", count=count, truncated=False)

    def _send_batch(self, rid: int, credit: _Credit, batch: list[dict[str, Any]]) -> bool:
        """One ``entries`` message, once the host's credit allows; False if it cancelled."""
        if not batch:
            return True
        if not credit.take(1):
            return False
        self.reply(rid, "entries", entries=batch)
        return True

    def op_stat(self, rid: int, msg: dict[str, Any]) -> None:
        path = _guest_path(msg["path"])
        with _acting(msg):
            st = os.lstat(path)
            info = _stat_dict(path, st)
        self.reply(rid, "ok", stat=info)

    def op_rename(self, rid: int, msg: dict[str, Any]) -> None:
        """Rename ``path`` to ``to`` (another directory of the same file system too), never
        over an existing entry (``file-exists``): ``renameat2(RENAME_NOREPLACE)``."""
        path = _guest_path(msg["path"])
        to = _guest_path(msg["to"])
        with _acting(msg):
            _rename_noreplace(path, to)
            info = _stat_dict(to, os.lstat(to))
        self.reply(rid, "ok", stat=info)

    def op_mkdir(self, rid: int, msg: dict[str, Any]) -> None:
        """Create a directory (and its parents with ``parents``); ``created`` is False if
        it was there already (with ``exist_ok``). Something else in the way, at the path
        or above it, is ``not-a-directory``."""
        path = _guest_path(msg["path"])
        exist_ok = bool(msg.get("exist_ok", True))
        with _acting(msg):
            try:
                if msg.get("parents", True):
                    parent = os.path.dirname(path.rstrip("/")) or "/"
                    os.makedirs(parent, exist_ok=True)
                os.mkdir(path)
                created = True
            except FileExistsError as exc:
                in_the_way = exc.filename if isinstance(exc.filename, str) else path
                if not os.path.isdir(in_the_way):
                    raise _Refused(
                        ErrorCode.NOT_A_DIRECTORY, f"{in_the_way} exists and is not a directory"
                    ) from None
                if not exist_ok or in_the_way != path:
                    raise
                created = False
        self.reply(rid, "ok", created=created)

    def op_watch_dir(self, rid: int, msg: dict[str, Any]) -> None:
        credit = self._credits[rid]
        try:
            with _acting(msg):  # its own thread: the watches are added as the account
                _Watch(self, rid, msg, credit).run()
        finally:
            self.forget_credit(rid, credit)

    def op_remove(self, rid: int, msg: dict[str, Any]) -> None:
        path = _guest_path(msg["path"])
        with _acting(msg):
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if msg.get("recursive", True):
                    import shutil  # only here: keeps the agent's start-up imports small

                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        self.reply(rid, "ok")

    def op_mount(self, rid: int, msg: dict[str, Any]) -> None:
        serial = str(msg["serial"])
        target = _guest_path(msg["path"])
        read_only = bool(msg.get("read_only"))
        device = None
        deadline = time.monotonic() + 5
        while device is None and time.monotonic() < deadline:
            for serial_file in _sys_files("/sys/block", "serial"):
                with open(serial_file) as f:
                    if f.read().strip() == serial:
                        device = "/dev/" + serial_file.split("/")[3]
            if device is None:
                time.sleep(0.02)
        if device is None:
            self.reply_error(
                rid, code=ErrorCode.MOUNT_FAILED, message=f"no block device with serial {serial}"
            )
            return
        fstype = str(msg.get("fstype") or "ext4")
        try:
            _mount(device, target, fstype, MS_RDONLY if read_only else 0)
        except OSError as exc:
            self.reply_error(
                rid, code=ErrorCode.MOUNT_FAILED, message=f"mount {device} on {target}: {exc}"
            )
            return
        self.reply(rid, "ok", device=device)

    def op_release(self, rid: int, msg: dict[str, Any]) -> None:
        """Make mounted drives consistent on their image before the VM is killed: unmount,
        or, if something still uses the drive, freeze it (flushes and checkpoints the
        journal)."""
        done = {}
        for path in msg.get("paths", []):
            target = _guest_path(path)
            if _libc.umount2(target.encode(), 0) == 0:
                done[target] = "unmounted"
                continue
            try:
                fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                finally:
                    os.close(fd)
                done[target] = "frozen"
            except OSError as exc:
                os.sync()
                done[target] = f"synced ({exc.strerror})"
        self.reply(rid, "ok", drives=done)

    def op_lifetime(self, rid: int, msg: dict[str, Any]) -> None:
        seconds = msg.get("seconds")
        if seconds is not None and not isinstance(seconds, (int, float)):
            raise ValueError("seconds must be a number or null")
        if _IN_VM:  # never arm a power-off outside a VM (--stdio tests)
            _LIFETIME.set(seconds)
        self.reply(rid, "ok")

    def op_sync(self, rid: int, msg: dict[str, Any]) -> None:
        """Before a snapshot: flush the file systems and optionally drop clean caches (a
        smaller memory image). Nothing is frozen: the VMM saves memory and disk at the
        same paused instant, so the pair is consistent without it."""
        _sync(bool(msg.get("drop_caches")))
        self.reply(rid, "ok")

    def op_freeze(self, rid: int, msg: dict[str, Any]) -> None:
        """Quiesce the root file system: flush, optionally drop clean caches, freeze.
        Writers block until ``thaw``. (Hosts froze it for every snapshot before the
        ``sync`` request existed.)"""
        _sync(bool(msg.get("drop_caches")))
        fd = os.open("/", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        finally:
            os.close(fd)
        self.reply(rid, "ok")

    def op_thaw(self, rid: int, msg: dict[str, Any]) -> None:
        self.reply(rid, "ok", thawed=_thaw("/"))


class _Lifetime:
    """Powers the VM off when the sandbox's lifetime ends: the host kills it then too,
    but this also holds when the host process that owned the sandbox is gone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the (idle) watchdog thread. Done at boot, so that a VM restored from a
        snapshot already has it and setting its lifetime costs no thread start."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True)
                self._thread.start()

    def set(self, seconds: float | None) -> None:
        self.start()
        with self._cond:
            valid = isinstance(seconds, (int, float)) and seconds > 0
            self._deadline = time.monotonic() + seconds if valid else None  # type: ignore[operator]
            self._cond.notify_all()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        _log("the sandbox's lifetime is over: powering off", 3)
        power_off()


_LIFETIME = _Lifetime()


_CPU_WINDOW_MIN = 0.1
_CPU_WINDOW_MAX = 10.0


class _CpuUse:
    """``cpu_used_pct``: the share of all CPUs' time (0-100) spent not idle, from
    /proc/stat, over a window of ``_CPU_WINDOW_MIN`` to ``_CPU_WINDOW_MAX`` seconds: since
    the previous metrics request when that was in the window (a caller polling every
    second sees each second's use), otherwise over a sample taken now (the request waits
    for it, up to ``_CPU_WINDOW_MIN``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, int, int] | None = None
        """(monotonic time, busy ticks, total ticks) of the previous request."""

    def percent(self) -> float:
        now, busy, total = _cpu_ticks()
        with self._lock:
            last, self._last = self._last, (now, busy, total)
        age = now - last[0] if last is not None else -1.0
        if last is None or not 0 <= age <= _CPU_WINDOW_MAX or total < last[2]:
            last, age = (now, busy, total), 0.0  # too old (or a clone's): sample now
        if age < _CPU_WINDOW_MIN:
            time.sleep(_CPU_WINDOW_MIN - age)
            now, busy, total = _cpu_ticks()
            with self._lock:
                self._last = (now, busy, total)
        ticks = total - last[2]
        if ticks <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * (busy - last[1]) / ticks))


def _cpu_ticks() -> tuple[float, int, int]:
    """Now, and the busy and total ticks of all CPUs since boot (/proc/stat's ``cpu``
    line: user nice system idle iowait irq softirq steal; guest time is in user's)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    ticks = [int(v) for v in fields[1:9]]
    total = sum(ticks)
    return time.monotonic(), total - ticks[3] - ticks[4], total


_CPU_USE = _CpuUse()


def _metrics() -> dict[str, Any]:
    """The ``metrics`` reply: CPU (``_CpuUse``), memory (/proc/meminfo: used is MemTotal -
    MemAvailable, what could not be had back without swapping) and the root file system
    (statvfs: used is what is not free, the blocks reserved for root included), in bytes."""
    mem: dict[str, int] = {}
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"MemTotal", b"MemAvailable", b"MemFree"):
                mem[name.decode()] = int(rest.split()[0]) * 1024  # kB
    available = mem.get("MemAvailable", mem.get("MemFree", 0))
    fs = os.statvfs("/")
    return {
        "cpu_used_pct": round(_CPU_USE.percent(), 1),
        "cpu_count": os.cpu_count() or 1,
        "mem_used": max(0, mem["MemTotal"] - available),
        "mem_total": mem["MemTotal"],
        "disk_used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize,
        "disk_total": fs.f_blocks * fs.f_frsize,
    }


def _reseed_rng(seed: bytes) -> None:
    """After a restore every clone starts from the same RNG state: credit fresh bytes from
    the host to the input pool and force the kernel's CRNG to reseed from it now."""
    rndaddentropy, rndreseedcrng = 0x40085203, 0x5207
    words = len(seed) // 4
    info = struct.pack(
        f"ii{words}I", words * 32, words * 4, *struct.unpack(f"{words}I", seed[: words * 4])
    )
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, rndaddentropy, info)
        fcntl.ioctl(fd, rndreseedcrng)
    finally:
        os.close(fd)


def _read_chunk(fd: int) -> bytes:
    """What a pipe has (up to ``CHUNK_SIZE``); b"" at its end or on an error."""
    try:
        return os.read(fd, CHUNK_SIZE)
    except OSError:
        return b""


def _sync(drop_caches: bool) -> None:
    os.sync()
    if drop_caches and _IN_VM:  # never the caches of a host (--stdio tests run as root)
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        except OSError as exc:
            _log(f"cannot drop caches: {exc}")


def _thaw(path: str) -> bool:
    """Thaw a frozen file system; False if it was not frozen."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        os.close(fd)


class _Credit:
    """Flow control of one request's data frames: the bytes (payload + ``FRAME_COST`` per
    frame) it may still send before the host acknowledges more (``WINDOW`` at first)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._cond = threading.Condition()
        self._left = window
        self.cancelled = False
        self.waiting = False
        """A sender is blocked on the host: the stream is busy, not idle."""
        self.wake: Callable[[], None] | None = None
        """Called after a grant or the cancel (a sender that polls file descriptors)."""

    def grant(self, n: int) -> None:
        with self._cond:
            self._left += n
            self._cond.notify_all()
        if self.wake is not None:
            self.wake()

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
        if self.wake is not None:
            self.wake()

    def try_take(self, cost: int) -> bool:
        """Count ``cost`` bytes if they may be sent now, without waiting."""
        with self._cond:
            if self.cancelled or self._left < cost:
                return False
            self._left -= cost
            return True

    def take(self, cost: int, deadline: float | None = None) -> bool | None:
        """Wait until ``cost`` bytes may be sent and count them; False once the host has
        cancelled the stream (the data is then dropped); None if ``deadline`` (monotonic)
        came first (nothing counted)."""
        with self._cond:
            while self._left < cost and not self.cancelled:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self.waiting = False
                    return None
                self.waiting = True
                self._cond.wait(left)
            self.waiting = False
            if self.cancelled:
                return False
            self._left -= cost
            return True


class _Exec:
    """One running command: its process, output pumps, stdin feeder and timeout."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        stdin_queue: queue.Queue[bytes],
        credit: _Credit,
        info: dict[str, Any],
        terminal: int | None = None,
    ) -> None:
        self.proc = proc
        self.terminal = terminal
        """The controlling side of its terminal (``pty``): output and input go through
        it, and ``resize`` sets its size (under ``terminal_lock``: -1 once closed)."""
        self.terminal_lock = threading.Lock()
        self.stdin_queue = stdin_queue
        self.credit = credit
        self.session = 0
        """The host connection it was started by (``Agent.session``)."""
        self.info = info
        """What ``ps`` says of it."""
        self.send_lock = threading.Lock()
        self.abandoned = False
        self.finished = False
        self.last_output = time.monotonic()
        self.stdin_closed = not info["stdin"]
        self._recent: list[tuple[Kind, bytes]] = []
        self._recent_size = 0
        self._watchers: dict[int, tuple[_Credit, list[int]]] = {}
        """Connections (``connect``) by request id: their credit and dropped bytes."""
        self._watch_lock = threading.Lock()

    def watch(self, agent: Agent, rid: int, credit: _Credit) -> None:
        """Stream to request ``rid`` too (``Agent.op_connect``)."""
        with self._watch_lock:
            if self.finished:
                raise _Refused(
                    ErrorCode.NO_SUCH_PROCESS, f"no running command with pid {self.proc.pid}"
                )
            for gone, (old, _) in list(self._watchers.items()):
                if old.cancelled:  # that client went away
                    del self._watchers[gone]
                    agent.forget_credit(gone, old)
            if len(self._watchers) >= MAX_WATCHERS:
                raise _Refused(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"command {self.proc.pid} already has {MAX_WATCHERS} connections",
                )
            dropped = [0]
            agent.reply(rid, "started", pid=self.proc.pid, argv=self.info["argv"])
            for kind, chunk in self._recent:
                self._send_to(agent, rid, credit, dropped, kind, chunk)
            self._watchers[rid] = (credit, dropped)

    def _send_to(
        self, agent: Agent, rid: int, credit: _Credit, dropped: list[int], kind: Kind, data: bytes
    ) -> None:
        if credit.try_take(len(data) + FRAME_COST):
            agent.send(encode_frame(rid, kind, data))
        elif not credit.cancelled:
            dropped[0] += len(data)

    def _fan_out(self, agent: Agent, kind: Kind, chunk: bytes) -> None:
        """Keep ``chunk`` among the latest output and send it to the connections."""
        with self._watch_lock:
            self._recent.append((kind, chunk))
            self._recent_size += len(chunk)
            while self._recent_size > RECENT_OUTPUT:
                old_kind, old = self._recent[0]
                cut = self._recent_size - RECENT_OUTPUT
                if cut >= len(old):
                    self._recent.pop(0)
                    self._recent_size -= len(old)
                else:
                    self._recent[0] = (old_kind, old[cut:])
                    self._recent_size -= cut
            for rid, (credit, dropped) in list(self._watchers.items()):
                if credit.cancelled:  # that client went away
                    del self._watchers[rid]
                    agent.forget_credit(rid, credit)
                else:
                    self._send_to(agent, rid, credit, dropped, kind, chunk)

    def _finish(self) -> dict[int, tuple[_Credit, list[int]]]:
        """It ended: no new connection, out of ``ps``; the connections to tell."""
        with self._watch_lock:
            self.finished = True
            watchers, self._watchers = self._watchers, {}
            self._recent = []
        return watchers

    def feed(self, data: bytes) -> None:
        """Data for stdin from any client (empty: close it)."""
        if self.stdin_closed:
            raise _Refused(
                ErrorCode.STDIN_CLOSED,
                f"the stdin of command {self.proc.pid} is closed (or was never open)",
            )
        if not data:
            self.stdin_closed = True
        self.stdin_queue.put(data)

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def run(self, agent: Agent, rid: int, timeout: float | None) -> None:
        """Forward the command's output until it ends, then reply its exit. One thread
        (this one) polls both pipes and a pidfd of the leader: a thread per pipe costs
        more than the rest of a short command's round trip under emulation. After the
        leader ends, output is forwarded until both pipes close or stay quiet for
        ``_OUTPUT_IDLE_GRACE`` (a sender blocked on the host is busy, not quiet); pipes
        that a background child keeps open are then drained and dropped in a thread."""
        pipes: dict[int, tuple[Any, Kind]]
        if self.terminal is not None:
            # one stream both ways: what the terminal shows, what is typed into it
            writer = os.fdopen(os.dup(self.terminal), "wb", buffering=0)
            threading.Thread(target=self._feed_stdin, args=(writer,), daemon=True).start()
            screen = os.fdopen(self.terminal, "rb", buffering=0)
            pipes = {self.terminal: (screen, Kind.STDOUT)}
        else:
            assert self.proc.stdout is not None and self.proc.stderr is not None
            if self.proc.stdin is not None:
                threading.Thread(
                    target=self._feed_stdin, args=(self.proc.stdin,), daemon=True
                ).start()
            pipes = {
                self.proc.stdout.fileno(): (self.proc.stdout, Kind.STDOUT),
                self.proc.stderr.fileno(): (self.proc.stderr, Kind.STDERR),
            }
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        pidfd = os.pidfd_open(self.proc.pid)
        poller = select.poll()
        try:
            poller.register(pidfd, select.POLLIN)
            for fd in pipes:
                poller.register(fd, select.POLLIN)
            ended = False
            while pipes or not ended:
                now = time.monotonic()
                if ended:
                    quiet = now - self.last_output
                    if quiet >= _OUTPUT_IDLE_GRACE:
                        break
                    wait: float | None = _OUTPUT_IDLE_GRACE - quiet
                else:
                    wait = None if deadline is None else deadline - now
                    if wait is not None and wait <= 0:
                        timed_out, deadline = True, None
                        self.kill(signal.SIGKILL)
                        continue
                for fd, _events in poller.poll(None if wait is None else wait * 1000 + 1):
                    if fd == pidfd:
                        poller.unregister(pidfd)
                        self.proc.wait()
                        ended = True
                        self.last_output = time.monotonic()  # the grace starts now
                        continue
                    pipe, kind = pipes[fd]
                    chunk = _read_chunk(fd)
                    if not chunk:
                        poller.unregister(fd)
                        del pipes[fd]
                        with self.terminal_lock:
                            pipe.close()
                            if fd == self.terminal:
                                self.terminal = -1
                        continue
                    if self._forward(agent, rid, kind, chunk, None if ended else deadline):
                        continue
                    timed_out, deadline = True, None  # the host held the stream past it
                    self.kill(signal.SIGKILL)
                    self._forward(agent, rid, kind, chunk, None, recorded=True)
        finally:
            os.close(pidfd)
        with self.send_lock:
            self.abandoned = True  # from here on the pipes are only drained
            self.credit.cancel()  # ...without waiting for the host
            self.stdin_queue.put(b"")
            rc = self.proc.returncode
            sig = -rc if rc < 0 else None
            ending = {"exit_code": 128 + sig if sig else rc, "signal": sig, "timed_out": timed_out}
            watchers = self._finish()  # first: who hears of the exit sees it gone from ps
            if self.session == agent.session:  # else rid is another host's request now
                agent.reply(rid, "exit", **ending)
        for wid, (credit, dropped) in watchers.items():
            if not credit.cancelled:
                agent.reply(wid, "exit", dropped=dropped[0], **ending)
            agent.forget_credit(wid, credit)
        if pipes:  # after _finish: nothing reaches the terminal by pid any more
            threading.Thread(target=self._drain, args=(list(pipes.values()),), daemon=True).start()

    def _forward(
        self,
        agent: Agent,
        rid: int,
        kind: Kind,
        chunk: bytes,
        deadline: float | None,
        recorded: bool = False,
    ) -> bool:
        """Send one chunk once the host's credit allows (dropped if it cancelled the
        stream); False, unsent, if ``deadline`` came first."""
        self.last_output = time.monotonic()
        if not recorded:
            self._fan_out(agent, kind, chunk)
        taken = self.credit.take(len(chunk) + FRAME_COST, deadline)
        if taken is None:
            return False
        if taken:
            with self.send_lock:
                if not self.abandoned:
                    agent.send(encode_frame(rid, kind, chunk))
        self.last_output = time.monotonic()
        return True

    @staticmethod
    def _drain(pipes: list[tuple[Any, Kind]]) -> None:
        """Read and drop what background children still write, until they close."""
        poller = select.poll()
        left = {pipe.fileno(): pipe for pipe, _kind in pipes}
        for fd in left:
            poller.register(fd, select.POLLIN)
        while left:
            for fd, _events in poller.poll():
                if not _read_chunk(fd):
                    poller.unregister(fd)
                    left.pop(fd).close()

    def _feed_stdin(self, stdin: Any) -> None:
        try:
            while data := self.stdin_queue.get():
                stdin.write(data)
                stdin.flush()
        except (OSError, ValueError):
            pass
        finally:
            try:
                stdin.close()
            except OSError:
                pass


class _Upload:
    """A file being written from DATA frames; the first error is kept and reported at the end."""

    def __init__(self, path: str, append: bool, mode: int | None) -> None:
        self.path = path
        self.size = 0
        self.stat: dict[str, Any] | None = None
        """The file's entry once written (taken before it is closed)."""
        self.error: OSError | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self.fd: int | None = os.open(path, flags, mode if isinstance(mode, int) else 0o644)
        except OSError as exc:
            self.fd = None
            self.error = exc

    def write(self, data: bytes) -> None:
        if self.fd is None or self.error is not None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            self.size += len(data)
        except OSError as exc:
            self.error = exc

    def close(self) -> OSError | None:
        if self.fd is not None:
            if self.error is None:
                try:
                    self.stat = _stat_dict(self.path, os.fstat(self.fd))
                except OSError:
                    pass  # the size is still reported
            try:
                os.close(self.fd)
            except OSError as exc:
                self.error = self.error or exc
        return self.error


_IN_MODIFY, _IN_ATTRIB, _IN_MOVED_FROM, _IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR, _IN_ISDIR = 0x4000, 0x8000, 0x01000000, 0x40000000
_IN_WATCHED = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_IN_TYPES = (
    (_IN_CREATE | _IN_MOVED_TO, "create"),
    (_IN_MODIFY, "write"),
    (_IN_DELETE, "remove"),
    (_IN_MOVED_FROM, "rename"),
    (_IN_ATTRIB, "chmod"),
)
_WATCH_QUEUE_BYTES = 4 << 20
"""Bytes of events (names) a watch holds while the host does not take them; the oldest
are dropped (and counted) beyond it."""
_INOTIFY_EVENT = struct.Struct("iIII")


class _Watch:
    """One ``watch_dir`` request: inotify on a directory (and, ``recursive``, on its
    subdirectories, including those made later), its events sent in ``events`` batches
    as the host's credit allows, until the host cancels, the directory goes, or the
    connection ends. The inotify descriptor is closed on the way out."""

    def __init__(self, agent: Agent, rid: int, msg: dict[str, Any], credit: _Credit) -> None:
        import collections  # only here (loaded already by queue, but not named at start-up)

        self.agent = agent
        self.rid = rid
        self.root = _guest_path(msg["path"]).rstrip("/") or "/"
        self.recursive = bool(msg.get("recursive"))
        self.credit = credit
        self.wds: dict[int, str] = {}
        """Watch descriptor -> its directory, relative to the root ("" for the root)."""
        self.pending: collections.deque[tuple[str, str]] = collections.deque()
        self.held = 0
        self.dropped = 0
        self.fd = -1

    def run(self) -> None:
        if not stat.S_ISDIR(os.stat(self.root).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", self.root)
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.credit.wake = lambda: os.eventfd_write(wake, 1)
            if self._add(self.root, "", must=True) and self.recursive:
                self._add_tree(self.root, "")
            self.agent.reply(self.rid, "watching", watches=len(self.wds))
            self._serve(wake)
        finally:
            self.credit.wake = None
            os.close(self.fd)
            os.close(wake)
        # last, once the descriptors are closed: the host's stop() waits for it
        self.agent.reply(self.rid, "ok", dropped=self.dropped)

    def _serve(self, wake: int) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        alive = True
        while alive and not self.credit.cancelled:
            for fd, _events in poller.poll():
                if fd == wake:
                    try:
                        os.eventfd_read(wake)
                    except BlockingIOError:
                        pass
                else:
                    alive = self._read()
            while self.pending and not self.credit.cancelled:
                taken = self.credit.take(1, time.monotonic())
                if not taken:
                    break  # no credit now (the host grants more, which wakes us) or cancelled
                self._send()
        while alive is False and self.pending and self.credit.take(1):
            self._send()  # the directory went: what it saw before still goes out

    def _send(self) -> None:
        batch, size = [], 0
        while self.pending and size < MESSAGE_BATCH:
            name, kind = self.pending.popleft()
            batch.append({"name": name, "type": kind})
            size += len(name) + 32
            self.held -= len(name) + 32
        dropped, self.dropped = self.dropped, 0
        self.agent.reply(self.rid, "events", events=batch, dropped=dropped)

    def _add(self, path: str, rel: str, must: bool = False) -> bool:
        if len(self.wds) >= MAX_WATCHES:
            return False
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_WATCHED)
        if wd < 0:
            err = ctypes.get_errno()
            if must:
                raise OSError(err, os.strerror(err), path)
            return False
        self.wds[wd] = rel
        return True

    def _add_tree(self, path: str, rel: str) -> None:
        """Watch the subdirectories under ``path`` (not through symlinks)."""
        todo = [(path, rel)]
        while todo and len(self.wds) < MAX_WATCHES:
            where, where_rel = todo.pop()
            try:
                with os.scandir(where) as it:
                    subdirs = [e for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in subdirs:
                sub_rel = f"{where_rel}/{entry.name}" if where_rel else entry.name
                if self._add(entry.path, sub_rel):
                    todo.append((entry.path, sub_rel))

    def _forget_tree(self, rel: str) -> None:
        """Stop watching a subtree that moved away (its names no longer hold)."""
        for wd, where in list(self.wds.items()):
            if where == rel or where.startswith(rel + "/"):
                _libc.inotify_rm_watch(self.fd, wd)
                self.wds.pop(wd, None)

    def _read(self) -> bool:
        """Take what inotify has; False once the watched directory itself is gone."""
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return True
            if not data:
                return True
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(data):
                wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
                start = offset + _INOTIFY_EVENT.size
                raw = data[start : start + length].split(b"\0", 1)[0]
                offset = start + length
                if mask & _IN_Q_OVERFLOW:
                    self.dropped += 1
                    continue
                where = self.wds.get(wd)
                if where is None:
                    continue
                if mask & _IN_IGNORED or mask & (_IN_DELETE_SELF | _IN_MOVE_SELF):
                    if where == "":
                        return False  # the directory itself was removed or moved
                    if mask & _IN_IGNORED:
                        self.wds.pop(wd, None)
                    continue
                name = os.fsdecode(raw)
                rel = f"{where}/{name}" if where else name
                for bits, kind in _IN_TYPES:
                    if mask & bits:
                        self._queue(_wire_name(rel), kind)
                if self.recursive and mask & _IN_ISDIR:
                    full = f"{self.root.rstrip('/')}/{rel}"
                    if mask & (_IN_CREATE | _IN_MOVED_TO):
                        if self._add(full, rel):
                            self._add_tree(full, rel)
                    elif mask & _IN_MOVED_FROM:
                        self._forget_tree(rel)

    def _queue(self, name: str, kind: str) -> None:
        cost = len(name) + 32
        if self.pending and self.pending[-1] == (name, kind) and kind == "write":
            return  # the same file written again before the host took the first
        self.pending.append((name, kind))
        self.held += cost
        while self.held > _WATCH_QUEUE_BYTES and self.pending:
            old, _ = self.pending.popleft()
            self.held -= len(old) + 32
            self.dropped += 1


def _require_regular(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    if not stat.S_ISREG(mode):
        raise _Refused(ErrorCode.NOT_A_REGULAR_FILE, f"{path} is not a regular file")


class _Refused(Exception):
    """A request refused with a specific error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _wire_name(name: str) -> str:
    """A file name as valid UTF-8 for the wire: undecodable bytes become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _guest_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError(f"path must be an absolute path without NUL bytes, got {value!r}")
    return value


def _stat_dict(
    path: str, st: os.stat_result, names: dict[tuple[str, int], str] | None = None
) -> dict[str, Any]:
    """An entry of the protocol (``ENTRY``). ``names`` caches the owner and group names
    of the ids seen (one listing's)."""
    if stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": _wire_name(os.path.basename(path.rstrip("/")) or "/"),
        "path": _wire_name(path),
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
        "owner": _id_name("user", st.st_uid, names),
        "group": _id_name("group", st.st_gid, names),
        "symlink_target": _wire_name(os.readlink(path)) if kind == "symlink" else None,
    }


def _id_name(kind: str, number: int, cache: dict[tuple[str, int], str] | None) -> str:
    """The name of a user or group id in the guest's own databases; the number itself
    when it has none (or one too long for the wire)."""
    if cache is not None and (kind, number) in cache:
        return cache[(kind, number)]
    import grp  # only here: keeps the agent's start-up imports small

    try:
        name = pwd.getpwuid(number).pw_name if kind == "user" else grp.getgrgid(number).gr_name
    except (KeyError, OverflowError):
        name = str(number)
    if not 0 < len(name) <= 32:
        name = str(number)
    if cache is not None:
        cache[(kind, number)] = name
    return name


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(path: str, to: str) -> None:
    """Rename, failing with EEXIST when ``to`` exists (atomically, where the file system
    has ``RENAME_NOREPLACE``; otherwise checked first)."""
    done = _libc.renameat2(
        _AT_FDCWD, os.fsencode(path), _AT_FDCWD, os.fsencode(to), _RENAME_NOREPLACE
    )
    if done == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err), to if err == errno.EEXIST else path)
    if os.path.lexists(to):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), to)
    os.rename(path, to)


_ERRNO_CODES = {
    errno.ENOENT: ErrorCode.FILE_NOT_FOUND,
    errno.ENOTDIR: ErrorCode.NOT_A_DIRECTORY,
    errno.EISDIR: ErrorCode.IS_A_DIRECTORY,
    errno.EEXIST: ErrorCode.FILE_EXISTS,
    errno.EACCES: ErrorCode.PERMISSION_DENIED,
    errno.EPERM: ErrorCode.PERMISSION_DENIED,
    errno.EROFS: ErrorCode.READ_ONLY_FILESYSTEM,
    errno.ENOSPC: ErrorCode.NO_SPACE,
    errno.ENOTEMPTY: ErrorCode.DIRECTORY_NOT_EMPTY,
}


def _error_code(exc: BaseException | None) -> ErrorCode:
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        return _ERRNO_CODES[exc.errno]
    return ErrorCode.OS_ERROR if isinstance(exc, OSError) else ErrorCode.AGENT_ERROR


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc)


def main() -> int:
    if "--stdio" in sys.argv:
        default_signals()
        return Agent(sys.stdin.fileno(), sys.stdout.fileno()).serve()
    if os.getpid() == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run_as_init()
        return 0
    return serve_port()


if __name__ == "__main__":
    sys.exit(main())
