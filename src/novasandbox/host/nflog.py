"""Hearing what the egress policy refuses: the kernel's NFLOG messages, read by the owner.

Each refusal rule of a sandbox's nftables chain (``egress.py``) is preceded by a
rate-limited ``log group N prefix "nsb:<sandbox id>:<rule>"`` rule: the kernel sends the
first bytes of each refused packet, with that prefix, to the netlink socket bound to
group N (``nfnetlink_log``). Only one socket can bind a group (per network namespace), so
each owner process binds a free one of its own (``hear``) the first time one of its
sandboxes needs it, and every sandbox chain it installs logs to that group. A daemon
thread reads the socket and hands each refusal to the sandbox it names
(``hear``, ``stop_hearing``); a prefix of a sandbox this process does not know (one of a
previous owner of the group) is dropped.

The message format (``linux/netfilter/nfnetlink_log.h``) is built and parsed by pure
functions here, which unit tests check with hand-made bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .netns import in_netns

log = logging.getLogger("novasandbox.nflog")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLA_TYPE_MASK = 0x3FFF
NLMSG = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian group)

PREFIX = "nsb"
"""Log prefixes are ``nsb:<sandbox id>:<rule code>``."""
COPY_RANGE = 96
"""Bytes of each packet the kernel copies: the IP header (up to 60) and the ports."""
RATE_PER_SECOND = 50
BURST = 100
"""The kernel logs at most this many refusals of one rule at once, then
``RATE_PER_SECOND``; every refusal is still counted (the reject rule's counter)."""
GROUP_BASE = 0x4E53
GROUP_SPAN = 4096
"""Owner processes pick their group in [GROUP_BASE, GROUP_BASE + GROUP_SPAN)."""

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 136: "udplite"}
WITH_PORTS = {6, 17, 132, 136}


def log_prefix(sandbox_id: str, code: str) -> str:
    return f"{PREFIX}:{sandbox_id}:{code}"


def parse_prefix(prefix: str) -> tuple[str, str] | None:
    """(sandbox id, rule code) of a log prefix of ours; None for any other. Pure."""
    parts = prefix.split(":")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _attr(kind: int, data: bytes) -> bytes:
    length = NLATTR.size + len(data)
    return NLATTR.pack(length, kind) + data + bytes(-length % 4)


def config_message(group: int, attrs: bytes, seq: int = 0) -> bytes:
    """An ``NFULNL_MSG_CONFIG`` request for ``group`` asking for an acknowledgement."""
    body = NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def bind_message(group: int, seq: int = 0) -> bytes:
    return config_message(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), seq)


def mode_message(group: int, copy_range: int = COPY_RANGE, seq: int = 0) -> bytes:
    """Copy ``copy_range`` bytes of each packet, and send each message at once."""
    attrs = _attr(NFULA_CFG_MODE, struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0))
    attrs += _attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
    return config_message(group, attrs, seq)


@dataclass(frozen=True, slots=True)
class Message:
    """One netlink message: its type and, for a logged packet, prefix and payload."""

    kind: int
    seq: int
    error: int = 0
    """For an ``NLMSG_ERROR`` (an acknowledgement when 0): the negative errno."""
    prefix: str | None = None
    payload: bytes | None = None


def parse_messages(data: bytes) -> list[Message]:
    """The netlink messages of one datagram (a truncated tail is dropped). Pure."""
    out = []
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size or offset + length > len(data):
            break
        body = data[offset + NLMSG.size : offset + length]
        if kind == NLMSG_ERROR and len(body) >= 4:
            out.append(Message(kind, seq, error=struct.unpack_from("=i", body)[0]))
        elif kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            prefix, payload = None, None
            for attr_kind, value in _attrs(body[NFGENMSG.size :]):
                if attr_kind == NFULA_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode("ascii", "replace")
                elif attr_kind == NFULA_PAYLOAD:
                    payload = value
            out.append(Message(kind, seq, prefix=prefix, payload=payload))
        else:
            out.append(Message(kind, seq))
        offset += (length + 3) & ~3
    return out


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > len(data):
            break
        out.append((kind & NLA_TYPE_MASK, data[offset + NLATTR.size : offset + length]))
        offset += (length + 3) & ~3
    return out


def parse_packet(payload: bytes) -> tuple[str, str, int | None] | None:
    """(protocol, destination address, destination port) of the start of an IP packet;
    None if it is not one. Pure."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header = (payload[0] & 0x0F) * 4
        number = payload[9]
        address = str(IPv4Address(payload[16:20]))
        fragment = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
    elif version == 6 and len(payload) >= 40:
        header, number = 40, payload[6]
        address = str(IPv6Address(payload[24:40]))
        fragment = 0
    else:
        return None
    port = None
    if number in WITH_PORTS and fragment == 0 and len(payload) >= header + 4:
        port = struct.unpack_from("!H", payload, header + 2)[0]
    return PROTOCOLS.get(number, str(number)), address, port


Sink = Callable[[str, str, int | None, str], None]
"""(protocol, address, port, rule code): called on the sandbox's event loop."""


class Listener:
    """This process's NFLOG socket in one network namespace, and the sandboxes it hears."""

    def __init__(self, sock: socket.socket, group: int) -> None:
        self.sock = sock
        self.group = group
        self.lost = 0
        """Times the socket overflowed (messages the kernel could not deliver)."""
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, Sink]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="novasandbox-nflog", daemon=True)
        self._thread.start()

    def register(self, sandbox_id: str, loop: asyncio.AbstractEventLoop, sink: Sink) -> None:
        with self._lock:
            self._sinks[sandbox_id] = (loop, sink)

    def unregister(self, sandbox_id: str) -> None:
        with self._lock:
            self._sinks.pop(sandbox_id, None)

    def registered(self) -> int:
        with self._lock:
            return len(self._sinks)

    def close(self) -> None:
        """Stop reading (within a second) and let the group go."""
        self._closed = True

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                if exc.errno == errno.EINTR:
                    continue
                log.warning("the NFLOG socket failed (refusals go unlogged): %s", exc)
                break
            for message in parse_messages(data):
                self._deliver(message)
        self.sock.close()

    def _deliver(self, message: Message) -> None:
        if message.prefix is None or message.payload is None:
            return
        named = parse_prefix(message.prefix)
        packet = parse_packet(message.payload)
        if named is None or packet is None:
            return
        with self._lock:
            target = self._sinks.get(named[0])
        if target is None:
            return
        loop, sink = target
        try:
            loop.call_soon_threadsafe(sink, *packet, named[1])
        except RuntimeError:  # that loop is closed: its sandbox is gone with it
            self.unregister(named[0])


def _request(sock: socket.socket, message: bytes, seq: int) -> int:
    """Send a config request and wait for its acknowledgement: 0 or a negative errno."""
    sock.send(message)
    while True:
        for reply in parse_messages(sock.recv(1 << 16)):
            if reply.kind == NLMSG_ERROR and reply.seq == seq:
                return reply.error


def open_listener(netns: str | None, first: int | None = None) -> Listener:
    """Bind a free NFLOG group in ``netns`` (an ``ip netns`` name; None: this one),
    starting at ``first`` (default: one derived from the pid), and start reading it."""
    sock = in_netns(
        netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    )
    try:
        sock.bind((0, 0))
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.settimeout(5.0)
        start = GROUP_BASE + (os.getpid() % GROUP_SPAN if first is None else first - GROUP_BASE)
        for step in range(GROUP_SPAN):
            group = GROUP_BASE + (start - GROUP_BASE + step) % GROUP_SPAN
            error = _request(sock, bind_message(group, 2 * step + 1), 2 * step + 1)
            if error in (-errno.EBUSY, -errno.EPERM, -errno.EEXIST):
                continue  # another process's group
            if error:
                raise OSError(-error, f"binding NFLOG group {group}: {os.strerror(-error)}")
            error = _request(sock, mode_message(group, seq=2 * step + 2), 2 * step + 2)
            if error:
                raise OSError(-error, f"configuring NFLOG group {group}: {os.strerror(-error)}")
            sock.settimeout(1.0)  # the reader looks at its closed flag each second
            return Listener(sock, group)
        raise OSError(errno.EBUSY, "every NFLOG group of our range is taken")
    except BaseException:
        sock.close()
        raise


_LISTENERS: dict[str | None, tuple[int, Listener | None]] = {}
_LISTENERS_LOCK = threading.Lock()


def _netns_id(netns: str | None) -> int:
    """Which namespace the name stands for now (a name can be deleted and made again)."""
    if netns is None:
        return 0
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return -1


def hear(
    netns: str | None, sandbox_id: str, loop: asyncio.AbstractEventLoop, sink: Sink
) -> Listener | None:
    """Have ``sink`` hear the refusals logged for ``sandbox_id`` in ``netns``: this
    process's listener there (opened on first use) with the sandbox registered; None
    where the kernel has no NFLOG (refusals are then counted but not logged)."""
    with _LISTENERS_LOCK:
        ident = _netns_id(netns)
        known = _LISTENERS.get(netns)
        if known is None or known[0] != ident:
            if known is not None and known[1] is not None:
                known[1].close()  # a namespace of that name that is gone
            opened: Listener | None
            try:
                opened = open_listener(netns)
            except OSError as exc:
                log.warning("refused connections will be counted but not logged: %s", exc)
                opened = None
            known = _LISTENERS[netns] = (ident, opened)
        found = known[1]
        if found is not None:
            found.register(sandbox_id, loop, sink)
        return found


def stop_hearing(found: Listener, sandbox_id: str, netns: str | None) -> None:
    """The sandbox is gone. A listener in a named namespace that no sandbox uses any more
    is closed (the namespace may be deleted; the socket would keep it alive); this
    namespace's stays for the next sandbox."""
    with _LISTENERS_LOCK:
        found.unregister(sandbox_id)
        if netns is None or found.registered():
            return
        found.close()
        known = _LISTENERS.get(netns)
        if known is not None and known[1] is found:
            del _LISTENERS[netns]
