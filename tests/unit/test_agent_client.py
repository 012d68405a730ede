"""The host side of the agent channel against a hostile peer (a compromised guest agent):
broken frames, oversized frames, invalid UTF-8, silence. Every case ends in a typed error,
never a hang or a crash of the host process."""

from __future__ import annotations

import asyncio
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from novasandbox.agent_client import AgentClient
from novasandbox.errors import AgentError, AgentProtocolError, AgentTimeout, SandboxFileError
from novasandbox.guest.protocol import (
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameDecoder,
    Kind,
    encode_frame,
    encode_message,
)

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def with_peer(peer: Peer, body: Callable[[Path], Awaitable[None]]) -> None:
    with tempfile.TemporaryDirectory(prefix="ns-") as tmp:
        sock = Path(tmp) / "agent.sock"
        server = await asyncio.start_unix_server(peer, path=str(sock))
        try:
            await body(sock)
        finally:
            server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    decoder = FrameDecoder()
    while True:
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("the host hung up")
        frames = decoder.feed(data)
        if frames:
            return frames[0].request_id, frames[0].message()


def hello_reply(rid: int, version: int = PROTOCOL_VERSION) -> bytes:
    return encode_message(rid, "hello", version=version, agent="test", kernel="k", pid=7)


def honest_hello(then: Callable[[int, asyncio.StreamWriter], bytes] | None = None) -> Peer:
    """Answers the handshake properly, then answers the next request with ``then``."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rid, _ = await read_request(reader)
        writer.write(hello_reply(rid))
        if then is not None:
            rid, _ = await read_request(reader)
            writer.write(then(rid, writer))
        await writer.drain()
        await asyncio.sleep(30)

    return peer


def connect(sock: Path) -> Awaitable[AgentClient]:
    return AgentClient.connect(sock, deadline=time.monotonic() + 5, hello={})


def run(peer: Peer, body: Callable[[AgentClient], Awaitable[None]]) -> None:
    async def main(sock: Path) -> None:
        client = await connect(sock)
        try:
            await asyncio.wait_for(body(client), 10)
        finally:
            await client.close()

    asyncio.run(with_peer(peer, main))


def test_oversized_frame_closes_the_channel_with_a_protocol_error() -> None:
    def huge(rid: int, _: asyncio.StreamWriter) -> bytes:
        return struct.pack(">IIB", MAX_PAYLOAD + 1, rid, int(Kind.MSG))

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError):
            await client.call("stat", path="/x")
        assert not client.is_open
        with pytest.raises(AgentProtocolError):  # later calls fail at once, typed
            await client.call("stat", path="/y")

    run(honest_hello(huge), body)


def test_invalid_utf8_message_is_a_protocol_error() -> None:
    def garbage(rid: int, _: asyncio.StreamWriter) -> bytes:
        return encode_frame(rid, Kind.MSG, b"\xff\xfe{not json")

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError):
            await client.call("stat", path="/x")

    run(honest_hello(garbage), body)


def test_unknown_frame_kind_is_a_protocol_error() -> None:
    def bad_kind(rid: int, _: asyncio.StreamWriter) -> bytes:
        return struct.pack(">IIB", 0, rid, 99)

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError):
            await client.call("stat", path="/x")

    run(honest_hello(bad_kind), body)


def test_silent_agent_times_out() -> None:
    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentTimeout):
            await client.call("stat", path="/x", timeout=0.3)

    run(honest_hello(lambda rid, w: b""), body)


@pytest.mark.parametrize("code", ["../../etc/passwd\u0000", "something-new", 5, None])
def test_an_error_code_outside_the_table_is_a_broken_reply(code: object) -> None:
    def weird(rid: int, _: asyncio.StreamWriter) -> bytes:
        return encode_message(rid, "error", code=code, message="x" * 10)

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError) as info:
            await client.call("stat", path="/x")
        assert info.value.agent_code is None  # the host's verdict, not the agent's
        assert client.is_open  # a refused request is not a broken channel

    run(honest_hello(weird), body)


def test_an_agent_error_keeps_its_code_and_path() -> None:
    def missing(rid: int, _: asyncio.StreamWriter) -> bytes:
        return encode_message(rid, "error", code="not-a-directory", message="no", errno=20)

    async def body(client: AgentClient) -> None:
        with pytest.raises(SandboxFileError) as info:
            await client.call("stat", path="/etc/passwd/x")
        assert info.value.agent_code is ErrorCode.NOT_A_DIRECTORY
        assert info.value.path == "/etc/passwd/x"

    run(honest_hello(missing), body)


def test_closed_connection_fails_pending_requests() -> None:
    def hang_up(rid: int, writer: asyncio.StreamWriter) -> bytes:
        writer.close()
        return b""

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentError):
            await client.call("stat", path="/x")

    run(honest_hello(hang_up), body)


@pytest.mark.parametrize(
    "reply",
    [
        hello_reply(1, PROTOCOL_VERSION + 1),
        encode_message(1, "hello", version=PROTOCOL_VERSION),  # fields missing
        encode_message(1, "error", code="version-mismatch", message="no"),
        encode_message(1, "pong"),
    ],
)
def test_handshake_refuses_a_wrong_peer(reply: bytes) -> None:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(5)

    async def body(sock: Path) -> None:
        with pytest.raises(AgentProtocolError):
            await connect(sock)

    asyncio.run(with_peer(peer, body))


def test_agent_restart_fails_requests_in_flight() -> None:
    def restarted(rid: int, _: asyncio.StreamWriter) -> bytes:
        return encode_message(0, "agent-started", pid=123)

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentError) as info:
            await client.call("stat", path="/x")
        assert "restarted" in str(info.value)

    run(honest_hello(restarted), body)
