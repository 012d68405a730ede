"""Hearing the egress policy's refusals: NFLOG messages (real kernel bytes and hand-made
ones), and what an owner keeps of them (bounded, rate-limited, counted)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from pathlib import Path

import pytest

from novasandbox.host import nflog, refusals
from novasandbox.host.refusals import Refusals, read_entries
from novasandbox.network import NetworkLog

# Two datagrams the kernel (6.18) sent to an NFLOG group for a "log group N snaplen 96
# prefix ..." rule: a TCP SYN to 203.0.113.80:443 and a UDP datagram to 203.0.113.9:53.
KERNEL_TCP = bytes.fromhex(
    "98000000000400000000000000000000020050b0080001000800030021000a006e73623a73622d30313233"
    "3435363738393a6e6f6e2d7075626c696300000000080005000000000408000b000000fffe08000e000000"
    "fffe400009004500003cbd1f400040067f49c0000202cb007150e83601bbb475f36e00000000a002ff00fe"
    "810000020405500402080adcc9dbe4000000000103030a"
)
KERNEL_UDP = bytes.fromhex(
    "7c000000000400000000000000000000020050b0080001000800030021000a006e73623a73622d30313233"
    "3435363738393a6e6f6e2d7075626c696300000000080005000000000408000b000000fffe08000e000000"
    "fffe210009004500001d8fe740004011acdcc0000202cb007109df5900350009fe2678000000"
)


def test_kernel_messages_parse() -> None:
    for data, expected in (
        (KERNEL_TCP, ("tcp", "203.0.113.80", 443)),
        (KERNEL_UDP, ("udp", "203.0.113.9", 53)),
    ):
        (message,) = nflog.parse_messages(data)
        assert message.kind == (nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET
        assert message.prefix == "nsb:sb-0123456789:non-public"
        assert nflog.parse_prefix(message.prefix) == ("sb-0123456789", "non-public")
        assert message.payload is not None
        assert nflog.parse_packet(message.payload) == expected


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + bytes(-length % 4)


def packet_message(prefix: str, payload: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(20051))
    body += attr(1, b"\x08\x00\x03\x00")  # NFULA_PACKET_HDR
    body += attr(nflog.NFULA_PREFIX, prefix.encode() + b"\0")
    body += attr(11 | 0x4000, struct.pack("!I", 1234))  # NFULA_UID, net byte order flag
    body += attr(nflog.NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), 0x400, 0, seq, 0) + body


def ipv4(proto: int, dst: str, rest: bytes, ihl: int = 5, frag: int = 0) -> bytes:
    header = bytes([0x40 | ihl, 0]) + struct.pack("!HHH", 20 + len(rest), 0, frag)
    header += bytes([64, proto, 0, 0]) + socket.inet_aton("10.0.2.15") + socket.inet_aton(dst)
    return header + bytes(4 * (ihl - 5)) + rest


def test_hand_made_messages_parse() -> None:
    udp = ipv4(17, "10.1.2.3", struct.pack("!HHHH", 40000, 5353, 8, 0))
    with_options = ipv4(6, "192.168.0.9", struct.pack("!HH", 40000, 8080), ihl=7)
    icmp = ipv4(1, "169.254.169.254", b"\x08\x00\x00\x00")
    fragment = ipv4(17, "10.1.2.3", b"\x00" * 8, frag=100)  # a later fragment: no ports
    v6 = (
        bytes([0x60, 0, 0, 0, 0, 8, 17, 64])
        + bytes(16)
        + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        + struct.pack("!HH", 1, 443)
    )
    ack = struct.pack("=IHHII", 36, nflog.NLMSG_ERROR, 0, 7, 0) + struct.pack("=i", 0) + bytes(16)
    data = b"".join(
        [
            packet_message("nsb:sb-a:allow-list", udp),
            packet_message("nsb:sb-a:allow-list", with_options),
            ack,
            packet_message("nsb:sb-b:no-egress", icmp),
            packet_message("nsb:sb-b:no-egress", fragment),
            packet_message("nsb:sb-c:not-ipv4", v6),
        ]
    )
    data += packet_message("nsb:sb-d:x", udp)[:30]  # a truncated tail is dropped
    messages = nflog.parse_messages(data)
    assert [m.error for m in messages if m.kind == nflog.NLMSG_ERROR] == [0]
    assert messages[2].seq == 7
    packets = [
        (nflog.parse_prefix(m.prefix), nflog.parse_packet(m.payload))
        for m in messages
        if m.prefix is not None and m.payload is not None
    ]
    assert packets == [
        (("sb-a", "allow-list"), ("udp", "10.1.2.3", 5353)),
        (("sb-a", "allow-list"), ("tcp", "192.168.0.9", 8080)),
        (("sb-b", "no-egress"), ("icmp", "169.254.169.254", None)),
        (("sb-b", "no-egress"), ("udp", "10.1.2.3", None)),
        (("sb-c", "not-ipv4"), ("udp", "2001:db8::1", 443)),
    ]


@pytest.mark.parametrize(
    "payload", [b"", b"\x45" * 10, b"\x60" * 20, b"\x10" * 40, ipv4(6, "1.2.3.4", b"\x00")]
)
def test_packets_that_are_not_ip_or_short(payload: bytes) -> None:
    parsed = nflog.parse_packet(payload)
    assert parsed is None or parsed[2] is None  # never a port read past the end


@pytest.mark.parametrize(
    "prefix", ["", "nsb", "nsb:sb-a", "nsb::x", "nsb:sb-a:", "other:sb-a:x", "nsb:a:b:c"]
)
def test_prefixes_of_others_are_ignored(prefix: str) -> None:
    assert nflog.parse_prefix(prefix) is None


def test_config_messages() -> None:
    bind = nflog.bind_message(20051, seq=3)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", bind)
    assert (length, kind, flags, seq) == (len(bind), 0x401, 0x5, 3)
    assert bind[16:20] == bytes([socket.AF_UNSPEC, 0]) + struct.pack("!H", 20051)
    assert bind[20:] == struct.pack("=HH", 5, nflog.NFULA_CFG_CMD) + b"\x01" + bytes(3)
    mode = nflog.mode_message(20051, 96)
    assert mode[20:32] == struct.pack("=HH", 10, nflog.NFULA_CFG_MODE) + struct.pack(
        "!IBB", 96, nflog.NFULNL_COPY_PACKET, 0
    ) + bytes(2)
    assert mode[32:] == struct.pack("=HH", 8, nflog.NFULA_CFG_QTHRESH) + struct.pack("!I", 1)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_refusals_are_logged_rate_limited_and_counted_exactly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "network.jsonl"
    changes: list[int] = []

    async def flood() -> Refusals:
        log = Refusals("sb-flood", path)
        log.on_change = lambda: changes.append(log.total)
        for i in range(3000):
            log.refused("udp", "203.0.113.9", 1000 + i % 7, "non-public")
        await asyncio.sleep(refusals.FLUSH_DELAY * 4)
        return log

    with caplog.at_level(logging.WARNING, logger="novasandbox.network"):
        log = run(flood())
    assert isinstance(log, Refusals)
    assert log.total == log.heard == 3000  # the guard hears every one: exact
    lines = [r.getMessage() for r in caplog.records if "sb-flood" in r.getMessage()]
    refused_lines = [line for line in lines if ": refused udp 203.0.113.9:" in line]
    # a burst, then the rate (the loop above takes far less than a second)
    assert refusals.BURST <= len(refused_lines) <= refusals.BURST + 2 * refusals.RATE
    assert refused_lines[0] == (
        "sandbox sb-flood: refused udp 203.0.113.9:1000 (rule: non-public range 203.0.113.0/24)"
    )
    assert any("were not logged (rate limit); 3000 refused in all" in line for line in lines)
    assert log.unlogged == 3000 - len(log.entries)
    assert len(log.entries) == len(refused_lines)
    assert changes and changes[-1] == 3000  # the record was told
    written = read_entries(path)
    assert written == list(log.entries)
    assert log.snapshot() == NetworkLog(3000, tuple(log.entries))


def test_the_file_and_memory_stay_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusals, "BURST", 10**9)  # log everything
    path = tmp_path / "network.jsonl"

    async def many() -> Refusals:
        log = Refusals("sb-many", path)
        for _ in range(6):
            for i in range(900):
                log.refused("tcp", "10.0.0.1", i + 1, "allow-list")
            await asyncio.sleep(refusals.FLUSH_DELAY * 2)
            assert len(path.read_text().splitlines()) <= 2 * NetworkLog.MAX_ENTRIES
        return log

    log = run(many())
    assert isinstance(log, Refusals)
    assert log.total == 5400
    assert len(log.entries) == NetworkLog.MAX_ENTRIES
    entries = read_entries(path)
    assert len(entries) == NetworkLog.MAX_ENTRIES
    assert entries[-1].port == 900 and entries == list(log.entries)


def test_kernel_counters_are_the_count(tmp_path: Path) -> None:
    """With the kernel's counters (root), the count is theirs: more than the refusals
    heard when the kernel logged only some; looked at again until it settles."""
    counter = [0]

    async def scenario() -> tuple[Refusals, NetworkLog]:
        log = Refusals("sb-k", tmp_path / "network.jsonl", lambda: counter[0])
        counter[0] = 250
        log.refused("tcp", "10.0.0.1", 22, "allow-list")
        await asyncio.sleep(refusals.FLUSH_DELAY * 2)
        assert log.total == 250
        counter[0] = 400  # refused after the last logged one: found by looking again
        await asyncio.sleep(refusals.FLUSH_DELAY * 3)
        assert log.total == 400
        counter[0] = 401
        return log, await log.refresh()

    log, now = run(scenario())  # type: ignore[misc]
    assert now.refused == 401 and log.heard == 1


def test_read_entries_skips_what_is_not_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "network.jsonl"
    good = {"time": 1.5, "protocol": "tcp", "address": "10.0.0.1", "port": 22, "rule": "r"}
    path.write_text(
        "\n".join([json.dumps(good), "not json", "[1, 2]", json.dumps({**good, "port": "22"}), "{"])
    )
    (entry,) = read_entries(path)
    assert (entry.protocol, entry.address, entry.port, entry.rule) == ("tcp", "10.0.0.1", 22, "r")
    assert read_entries(tmp_path / "missing") == []


@pytest.mark.parametrize("where", ["loop", "thread"])
def test_closed_refusals_hear_nothing_more(tmp_path: Path, where: str) -> None:
    """Closed on its loop or from another thread (a VM is released from a worker
    thread): its pending flush is cancelled."""

    async def scenario() -> Refusals:
        log = Refusals("sb-c", tmp_path / "network.jsonl")
        log.refused("tcp", "10.0.0.1", 22, "allow-list")
        if where == "loop":
            log.close()
        else:
            await asyncio.to_thread(log.close)
        log.refused("tcp", "10.0.0.1", 23, "allow-list")
        await asyncio.sleep(refusals.FLUSH_DELAY * 2)
        return log

    log = run(scenario())
    assert isinstance(log, Refusals)
    assert log.heard == 1
    assert not (tmp_path / "network.jsonl").exists()  # its flush was cancelled
