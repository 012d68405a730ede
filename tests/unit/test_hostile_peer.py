"""The host's commands and files layers against a hostile agent, without a VM: a peer on a
unix socket that floods, sends malformed replies, stops reading or trickles output. Each
case must end in a typed error on time, with the owner's memory flat; the real agent
(``agent.py --stdio``) shows that an honest peer is not hurt by the same limits.

The same attacks on real VMs are in ``tests/integration/test_hostile.py``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from novasandbox import agent_client, commands
from novasandbox.agent_client import AgentClient
from novasandbox.commands import AsyncCommands
from novasandbox.config import MachineConfig
from novasandbox.errors import (
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    FileTooLarge,
    NotARegularFile,
    NovaSandboxError,
    SandboxFileError,
    SandboxNotRunning,
    SandboxPermissionError,
)
from novasandbox.files import AsyncFiles
from novasandbox.guest import agent as agent_module
from novasandbox.guest.protocol import (
    PROTOCOL_VERSION,
    WINDOW,
    ErrorCode,
    FrameDecoder,
    Kind,
    encode_frame,
    encode_message,
)
from tests.hostile import MALFORMED, rss_mib

MIB = 1 << 20
Behaviour = Callable[[int, dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


class Shim:
    """What ``AsyncCommands``/``AsyncFiles`` use of a sandbox, around a bare client."""

    def __init__(self, client: AgentClient) -> None:
        self.id = "sb-unit"
        self.config = MachineConfig()
        self._agent = client

    def _require_agent(self) -> AgentClient:
        return self._agent

    async def _raise_if_crashed(self) -> None:
        return None


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, act: Behaviour) -> None:
    """A peer that answers the handshake, then hands every other message to ``act``."""
    decoder = FrameDecoder()
    tasks = set()
    try:
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.kind is not Kind.MSG:
                    continue
                msg = frame.message()
                if msg["op"] == "hello":
                    writer.write(
                        encode_message(
                            frame.request_id,
                            "hello",
                            version=PROTOCOL_VERSION,
                            agent="hostile",
                            kernel="k",
                            pid=1,
                        )
                    )
                elif msg["op"] not in ("ack", "cancel"):
                    task = asyncio.create_task(act(frame.request_id, msg, writer))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
    except (ConnectionError, OSError):
        pass
    finally:
        for task in tasks:
            task.cancel()


@asynccontextmanager
async def hostile(act: Behaviour) -> AsyncIterator[tuple[AsyncCommands, AsyncFiles, Shim]]:
    with tempfile.TemporaryDirectory(prefix="ns-") as tmp:
        path = Path(tmp) / "agent.sock"
        server = await asyncio.start_unix_server(lambda r, w: serve(r, w, act), path=str(path))
        client = await AgentClient.connect(path, deadline=time.monotonic() + 5, hello={})
        shim = Shim(client)
        try:
            yield AsyncCommands(cast(Any, shim)), AsyncFiles(cast(Any, shim)), shim
        finally:
            client.abort(SandboxNotRunning("test over"))
            await client.wait_closed()
            server.close()


async def forever(writer: asyncio.StreamWriter, block: bytes) -> None:
    while True:
        writer.write(block)
        await writer.drain()


async def flood_exec(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
    writer.write(encode_message(rid, "started", pid=1))
    await forever(writer, encode_frame(rid, Kind.STDOUT, b"x" * 10) * 4096)


def timed(coro: Awaitable[Any]) -> Callable[[], Awaitable[tuple[BaseException | None, float]]]:
    async def run() -> tuple[BaseException | None, float]:
        t0 = time.monotonic()
        try:
            await coro
        except BaseException as exc:
            return exc, time.monotonic() - t0
        return None, time.monotonic() - t0

    return run


def test_a_flood_of_tiny_output_frames_is_counted_and_the_deadline_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commands, "_AGENT_GRACE", 0.5)

    async def main() -> None:
        before = rss_mib()
        async with hostile(flood_exec) as (cmds, _, shim):
            t0 = time.monotonic()
            handle = await cmds.start("true", timeout=2, max_output=1000)
            with pytest.raises(AgentTimeout, match="2 s timeout"):
                await handle.wait()
            took = time.monotonic() - t0
            # kept: the first 1000 bytes; the rest counted as it came, nothing queued
            assert len(handle._buffers[Kind.STDOUT]) == 1000
            assert handle._dropped[Kind.STDOUT] > 100_000
            assert shim._agent.is_open  # the channel still serves other requests
        assert 2.4 < took < 4.0
        assert rss_mib() - before < 64

    asyncio.run(main())


def test_a_flood_past_the_window_of_a_slow_callback_fails_the_command() -> None:
    async def main() -> None:
        before = rss_mib()

        async def slow(text: str) -> None:
            await asyncio.sleep(0.5)

        async with hostile(flood_exec) as (cmds, _, shim):
            t0 = time.monotonic()
            with pytest.raises(AgentProtocolError, match="flow-control window"):
                await cmds.run("true", timeout=30, on_stdout=slow)
            assert time.monotonic() - t0 < 5
            assert shim._agent.is_open
        assert rss_mib() - before < 64

    asyncio.run(main())


def test_a_message_flood_fails_the_command() -> None:
    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(encode_message(rid, "started", pid=1))
        await forever(writer, encode_message(rid, "noise") * 2048)

    async def main() -> None:
        before = rss_mib()
        async with hostile(act) as (cmds, _, _shim):
            with pytest.raises(AgentProtocolError):
                await cmds.run("true", timeout=5)
        assert rss_mib() - before < 64

    asyncio.run(main())


def test_a_deadline_holds_while_output_trickles_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commands, "_AGENT_GRACE", 0.5)

    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(encode_message(rid, "started", pid=1))
        while True:  # within the window, never an exit
            writer.write(encode_frame(rid, Kind.STDOUT, b"."))
            await asyncio.sleep(0.001)

    async def main() -> None:
        async with hostile(act) as (cmds, _, _shim):
            seen: list[str] = []
            t0 = time.monotonic()
            with pytest.raises(AgentTimeout, match="1 s timeout"):
                await cmds.run("sleep 100", timeout=1, on_stdout=seen.append)
            assert 1.4 < time.monotonic() - t0 < 3.0
            assert seen  # output was delivered until then

    asyncio.run(main())


def test_a_start_that_never_comes_is_bounded_by_the_command_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(commands, "_AGENT_GRACE", 0.5)

    async def silent(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        return None

    async def main() -> None:
        async with hostile(silent) as (cmds, _, _shim):
            t0 = time.monotonic()
            with pytest.raises(AgentTimeout, match="start the command"):
                await cmds.run("true", timeout=1)
            assert time.monotonic() - t0 < 3.0

    asyncio.run(main())


def test_a_read_flood_stops_at_max_size() -> None:
    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        await forever(writer, encode_frame(rid, Kind.DATA, bytes(65536)))

    async def main() -> None:
        before = rss_mib()
        async with hostile(act) as (_, files, shim):
            with pytest.raises(FileTooLarge, match="8388608-byte limit"):
                await files.read("/x", max_size=8 * MIB)
            assert shim._agent.is_open
        assert rss_mib() - before < 64

    asyncio.run(main())


def test_a_read_that_never_ends_meets_its_deadline() -> None:
    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(encode_frame(rid, Kind.DATA, b"z"))
            await asyncio.sleep(0.001)

    async def main() -> None:
        async with hostile(act) as (_, files, _shim):
            t0 = time.monotonic()
            with pytest.raises(AgentTimeout):
                await files.read("/x", timeout=1)
            assert time.monotonic() - t0 < 2.0

    asyncio.run(main())


def malformed_peer() -> Behaviour:
    counts: dict[str, int] = {}

    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = msg["op"]
        if op == "write_file":
            return  # answered at its "end"
        key = "write_file" if op == "end" else op if op in MALFORMED else "other"
        n = counts.get(key, 0)
        counts[key] = n + 1
        for reply in MALFORMED[key][n % len(MALFORMED[key])]:
            payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            writer.write(encode_frame(rid, Kind.MSG, payload))

    return act


def test_every_malformed_reply_is_an_agent_protocol_error() -> None:
    async def main() -> None:
        async with hostile(malformed_peer()) as (cmds, files, shim):
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "exec": lambda: cmds.run("true", timeout=5),
                "stat": lambda: files.stat("/x"),
                "list": lambda: files.list("/"),
                "read_file": lambda: files.read("/x"),
                "write_file": lambda: files.write("/x", b"y"),
                "other": lambda: files.make_dir("/d"),
            }
            for op, call in calls.items():
                for i in range(len(MALFORMED[op])):
                    try:
                        await asyncio.wait_for(call(), 10)
                    except AgentProtocolError:
                        pass
                    else:
                        pytest.fail(f"{op} reply #{i} was accepted")
            assert shim._agent.is_open  # a bad reply fails its request, not the channel

    asyncio.run(main())


def test_a_guest_that_stops_reading_cannot_hang_writes_or_abort() -> None:
    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1 << 16)
        rid = FrameDecoder().feed(data)[0].request_id
        writer.write(
            encode_message(rid, "hello", version=PROTOCOL_VERSION, agent="a", kernel="k", pid=1)
        )
        await writer.drain()
        await asyncio.sleep(60)  # never reads again

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="ns-") as tmp:
            path = Path(tmp) / "agent.sock"
            server = await asyncio.start_unix_server(deaf, path=str(path))
            client = await AgentClient.connect(path, deadline=time.monotonic() + 5, hello={})
            files = AsyncFiles(cast(Any, Shim(client)))
            t0 = time.monotonic()
            with pytest.raises(AgentTimeout, match="stopped reading"):
                await files.write("/big", bytes(64 * MIB), timeout=1)
            assert time.monotonic() - t0 < 2.5
            # a second upload is in flight when the channel is aborted: it fails at once
            pending = asyncio.create_task(files.write("/big2", bytes(64 * MIB)))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            client.abort(SandboxNotRunning("killed"))
            await client.wait_closed()
            with pytest.raises(SandboxNotRunning):
                await pending
            assert time.monotonic() - t0 < 0.5
            server.close()

    asyncio.run(main())


def test_frames_for_dead_requests_break_the_channel_after_a_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_client, "JUNK_LIMIT", 4 * MIB)
    closed: list[NovaSandboxError] = []

    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(encode_message(rid, "pong"))
        await forever(writer, encode_frame(rid + 1000, Kind.STDOUT, bytes(4096)) * 64)

    async def main() -> None:
        async with hostile(act) as (_, _files, shim):
            shim._agent._on_close = closed.append
            assert (await shim._agent.call("ping"))["op"] == "pong"
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.05)
            assert not shim._agent.is_open
        assert closed and isinstance(closed[0], AgentProtocolError)

    asyncio.run(main())


# ------------------------------------------------------------- the real agent, honestly


@asynccontextmanager
async def real_agent() -> AsyncIterator[tuple[AsyncCommands, AsyncFiles]]:
    """The real agent (``agent.py --stdio``) on one end of a socket pair."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, agent_module.__file__, "--stdio"], stdin=guest, stdout=guest
    )
    guest.close()
    reader, writer = await asyncio.open_unix_connection(sock=host)
    client = AgentClient(reader, writer)
    try:
        await client._handshake(time.monotonic() + 10, {}, None)
        shim = Shim(client)
        yield AsyncCommands(cast(Any, shim)), AsyncFiles(cast(Any, shim))
    finally:
        client.abort(SandboxNotRunning("test over"))
        await client.wait_closed()
        proc.kill()
        proc.wait()


def test_a_slow_callback_gets_everything_and_the_agent_keeps_to_its_window() -> None:
    total = 3 * WINDOW

    async def main() -> None:
        seen = 0

        async def slow(text: str) -> None:
            nonlocal seen
            seen += len(text)
            await asyncio.sleep(0.002)

        async with real_agent() as (cmds, _files):
            result = await cmds.run(
                ["head", "-c", str(total), "/dev/zero"], on_stdout=slow, max_output=1024
            )
        assert result.exit_code == 0
        assert seen == total  # an agent past its window would have failed the command
        assert len(result.stdout) == 1024 and result.stdout_dropped == total - 1024

    asyncio.run(main())


def test_reads_are_limited_to_regular_files_of_max_size(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "result.json"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * WINDOW))

    async def main() -> None:
        async with real_agent() as (_cmds, files):
            for path in (fifo, zero):
                with pytest.raises(NotARegularFile) as info:
                    await files.read(str(path), timeout=5)
                assert info.value.code == "not-a-regular-file"
            with pytest.raises(FileTooLarge, match="over the 1048576-byte limit"):
                await files.read(str(big), max_size=MIB)
            # bigger than the window: the host's acknowledgements keep it flowing
            assert await files.read(str(big), format="bytes") == big.read_bytes()

    asyncio.run(main())


def test_a_file_that_keeps_growing_is_refused(tmp_path: Path) -> None:
    grow = tmp_path / "grow"
    grow.write_bytes(b"")
    writer = subprocess.Popen(["sh", "-c", f"while :; do cat /bin/sh; done >> {grow}"])

    async def main() -> None:
        limit = 8 * MIB
        async with real_agent() as (_cmds, files):
            for _ in range(200):  # caught while it grows, or at open once it is too big
                try:
                    data = await files.read(str(grow), format="bytes", max_size=limit)
                except FileTooLarge:
                    return
                assert len(data) <= limit
                await asyncio.sleep(0.01)
            pytest.fail("a file growing without end was never refused")

    try:
        asyncio.run(main())
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize(
    ("code", "message", "raised"),
    [
        ("no-such-process", "the command ended", None),
        # the text says what the code does not: the code decides
        ("agent-error", "no-such-process", AgentError),
        ("permission-denied", "no-such-process", SandboxPermissionError),
    ],
)
def test_a_refused_signal_is_judged_by_its_code(
    code: str, message: str, raised: type[NovaSandboxError] | None
) -> None:
    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        if msg["op"] == "exec":
            writer.write(encode_message(rid, "started", pid=1))
        elif msg["op"] == "signal":
            writer.write(encode_message(rid, "error", code=code, message=message))
        await writer.drain()

    async def main() -> None:
        async with hostile(act) as (cmds, _, _shim):
            handle = await cmds.start("sleep 60", timeout=None)
            if raised is None:
                await handle.send_signal(9)  # the command ended meanwhile: no error
            else:
                with pytest.raises(raised) as info:
                    await handle.send_signal(9)
                assert info.value.agent_code == code

    asyncio.run(main())


def test_exists_is_false_below_a_file_by_the_code_not_the_text(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    async def main() -> None:
        async with real_agent() as (_cmds, files):
            assert await files.exists(str(tmp_path / "file"))
            assert not await files.exists(str(tmp_path / "file" / "below"))  # not-a-directory
            assert not await files.exists(str(tmp_path / "missing"))  # file-not-found

    asyncio.run(main())

    async def lying(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(encode_message(rid, "error", code="os-error", message="not-a-directory"))
        await writer.drain()

    async def hostile_main() -> None:
        async with hostile(lying) as (_, files, _shim):
            with pytest.raises(SandboxFileError) as info:
                await files.exists("/x")
            assert info.value.agent_code is ErrorCode.OS_ERROR

    asyncio.run(hostile_main())


def exit_peer(dropped: Any, *, absent: bool = False) -> Behaviour:
    """Starts every command (``exec`` or ``connect``) and ends it at once with ``dropped``."""

    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(encode_message(rid, "started", pid=7, argv=["x"]))
        ending: dict[str, Any] = {"exit_code": 0, "signal": None, "timed_out": False}
        if not absent:
            ending["dropped"] = dropped
        writer.write(encode_message(rid, "exit", **ending))
        await writer.drain()

    return act


@pytest.mark.parametrize("dropped", ["x", -5, 1.5, True, [1]])
def test_an_exit_with_a_bad_dropped_count_is_an_agent_protocol_error(dropped: Any) -> None:
    async def main() -> None:
        async with hostile(exit_peer(dropped)) as (cmds, _, shim):
            with pytest.raises(AgentProtocolError, match="'dropped'"):
                await cmds.run("true", timeout=5)
            handle = await cmds.connect(7)
            with pytest.raises(AgentProtocolError, match="'dropped'"):
                await handle.wait()
            assert shim._agent.is_open

    asyncio.run(main())


def test_an_exit_counts_dropped_output_only_as_a_non_negative_int() -> None:
    async def main() -> None:
        async with hostile(exit_peer(None, absent=True)) as (cmds, _, _shim):
            assert (await cmds.run("true", timeout=5)).missed == 0  # exec: no field
            with pytest.raises(AgentProtocolError, match="'dropped' is missing"):
                await (await cmds.connect(7)).wait()  # a connection's exit must count
        async with hostile(exit_peer(12)) as (cmds, _, _shim):
            assert (await cmds.run("true", timeout=5)).missed == 12
            assert (await (await cmds.connect(7)).wait()).missed == 12

    asyncio.run(main())


def test_write_files_names_the_timeout_of_the_call_not_what_was_left() -> None:
    ends = 0

    async def act(rid: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        nonlocal ends
        if msg["op"] != "end":
            return
        ends += 1
        if ends > 1:
            return  # the second file is never confirmed
        await asyncio.sleep(0.4)  # most of the call's timeout goes on the first file
        stat = {
            "name": "a",
            "path": "/a",
            "type": "file",
            "size": 1,
            "mode": 0o644,
            "mtime": 0.0,
            "owner": "root",
            "group": "root",
            "symlink_target": None,
        }
        writer.write(encode_message(rid, "ok", size=1, stat=stat))
        await writer.drain()

    async def main() -> None:
        async with hostile(act) as (_, files, _shim):
            t0 = time.monotonic()
            with pytest.raises(AgentTimeout) as info:
                await files.write_files(
                    [{"path": "/a", "data": b"1"}, {"path": "/b", "data": b"2"}], timeout=0.5
                )
            assert time.monotonic() - t0 < 1.5
            assert str(info.value).endswith("did not write /b within 0.5 s")

    asyncio.run(main())


def test_a_watch_keeps_a_bounded_number_of_bytes_of_names() -> None:
    from novasandbox.files import MAX_KEPT_EVENT_BYTES, AsyncWatchHandle, FilesystemEvent

    async def main() -> None:
        handle = AsyncWatchHandle("/d", None)
        long = "n" * 16_000
        events = [FilesystemEvent(f"/d/{i:05}{long}", "create") for i in range(1000)]
        await handle._arrived(events[:500], 3)
        await handle._arrived(events[500:], 0)
        kept = handle.get_new_events()
        assert sum(len(e.name) for e in kept) <= MAX_KEPT_EVENT_BYTES
        assert 200 < len(kept) < 300  # the byte budget bound it, not the count
        assert kept == events[-len(kept) :]  # the newest stay, in order
        assert handle.dropped == 3 + 1000 - len(kept)
        # once read, the budget is free again
        await handle._arrived(events[:100], 0)
        assert handle.get_new_events() == events[:100]
        assert handle.dropped == 3 + 1000 - len(kept)

    asyncio.run(main())
