"""Test support: a hostile guest that takes over the agent's port, and helpers to mount it.

``FAKE_AGENT`` is the source of a fake guest agent (standard library only, run by the
guest's ``python3`` as root). Started as a command of the real agent, it SIGKILLs its
parent (the agent), opens the agent's virtio-serial port before init's restarted agent
does (killing restarted agents while the port is busy), announces itself like a new
agent (``agent-started`` on id 0) and then serves the host by mode (its ``argv[1]``):

* every mode answers ``ping`` with ``{"op": "pong", "fake": true}`` and ``hello`` like
  the real agent (version echoed, ``agent`` "fake");
* ``flood``: ``exec`` is answered ``started``, then 10-byte STDOUT frames for it forever;
  ``read_file`` gets 64 KiB DATA frames of zeros forever;
* ``msgflood``: ``exec`` is answered ``started``, then ``{"op": "noise"}`` messages forever;
* ``garbage``: the first other request gets a header announcing a 0xFFFFFFF0-byte payload
  and 64 KiB of random bytes; the fake keeps the port 2 s, then exits (init's restarted
  agent takes the port back);
* ``malformed``: each request gets a well-framed but wrong reply, the next of
  ``MALFORMED[op]`` in turn (``write_file`` is answered at its ``end``; ops without an
  entry use ``MALFORMED["other"]``);
* ``silent``: reads everything, answers nothing.

A stopped agent (SIGSTOP) needs no fake: see ``stop_agent_soon``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, Final

from novasandbox import AsyncSandbox, NovaSandboxError, Sandbox
from novasandbox.sync import _Portal

Reply = dict[str, Any] | bytes
"""A message the fake sends: a dict (sent as JSON) or a raw MSG payload."""

MALFORMED: Final[dict[str, list[list[Reply]]]] = {
    "exec": [
        [{"op": "started", "pid": "x"}],
        [{"op": "bogus"}],
        [{"op": "started", "pid": 1}, {"op": "exit"}],
        [
            {"op": "started", "pid": 1},
            {"op": "exit", "exit_code": "0", "signal": None, "timed_out": False},
        ],
    ],
    "stat": [
        [{"op": "ok"}],
        [{"op": "ok", "stat": {"name": 1}}],
        [{"op": "ok", "stat": "x"}],
        [{"op": "error"}],
        [{"op": "error", "code": 5, "message": []}],
    ],
    "list": [
        [{"op": "ok", "entries": "x"}],
        [{"op": "ok", "entries": [{"name": "a"}]}],
    ],
    "read_file": [
        [{"op": "ok", "size": "big"}],
        [b"{not json"],
        [b"[1,2]"],
    ],
    "write_file": [
        [{"op": "ok"}],
        [{"op": "ok", "size": -1.5}],
    ],
    "other": [[{"op": "bogus"}]],
}
"""Per request op, the replies the ``malformed`` fake cycles through (one list per request)."""

_FAKE_AGENT_BODY = r'''
import errno, json, os, signal, struct, sys, threading, time

HEADER = struct.Struct(">IIB")
MSG, STDOUT, DATA = 1, 3, 5
PORT_NAME = "org.novasandbox.agent"
MODE = sys.argv[1]
COUNTS = {}


def frame(rid, kind, payload):
    return HEADER.pack(len(payload), rid, kind) + payload


def message(rid, fields):
    return frame(rid, MSG, json.dumps(fields).encode())


class Port:
    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, data):
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]

    def send_forever(self, block):
        def loop():
            while True:
                self.send(block)

        threading.Thread(target=loop, daemon=True).start()


def find_port():
    for entry in os.listdir("/sys/class/virtio-ports"):
        try:
            with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                if f.read().strip() == PORT_NAME:
                    return "/dev/" + entry
        except OSError:
            pass
    raise SystemExit("no agent port")


def kill_restarted_agents():
    """SIGKILL init's children that run init's program: agents it restarted."""
    with open("/proc/1/cmdline", "rb") as f:
        init_cmdline = f.read()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if ppid == 1 and cmdline == init_cmdline:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def take_port():
    dev = find_port()
    os.kill(os.getppid(), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        try:
            return os.open(dev, os.O_RDWR)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        kill_restarted_agents()
        time.sleep(0.005)


def handle(port, rid, msg):
    op = msg.get("op")
    if op == "ping":
        port.send(message(rid, {"op": "pong", "fake": True}))
    elif op == "hello":
        port.send(message(rid, {
            "op": "hello", "version": msg.get("version"), "agent": "fake",
            "kernel": "fake", "pid": os.getpid(),
        }))
    elif MODE in ("flood", "msgflood") and op == "exec":
        port.send(message(rid, {"op": "started", "pid": 1}))
        if MODE == "flood":
            port.send_forever(frame(rid, STDOUT, b"x" * 10) * 4096)
        else:
            port.send_forever(message(rid, {"op": "noise"}) * 2048)
    elif MODE == "flood" and op == "read_file":
        port.send_forever(frame(rid, DATA, bytes(65536)))
    elif MODE == "garbage":
        port.send(HEADER.pack(0xFFFFFFF0, rid, MSG) + os.urandom(65536))
        time.sleep(2)
        os._exit(0)
    elif MODE == "malformed" and op != "write_file":  # an upload is answered at its "end"
        key = "write_file" if op == "end" else op if op in MALFORMED else "other"
        n = COUNTS.get(key, 0)
        COUNTS[key] = n + 1
        for reply in MALFORMED[key][n % len(MALFORMED[key])]:
            payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            port.send(frame(rid, MSG, payload))


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the pipes belonged to the agent this kills
        os.dup2(null, fd)
    port = Port(take_port())
    port.send(message(0, {"op": "agent-started", "pid": os.getpid()}))
    buf = bytearray()
    while True:
        try:
            data = os.read(port.fd, 65536)
        except InterruptedError:
            continue
        if not data:  # the host end is closed: wait for it to come back
            time.sleep(0.01)
            continue
        buf += data
        while len(buf) >= HEADER.size:
            length, rid, kind = HEADER.unpack_from(buf)
            if length > 1 << 20 or not 1 <= kind <= 5:
                buf.clear()  # out of sync (we may have started mid-frame): start over
                break
            end = HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[HEADER.size:end])
            del buf[:end]
            if kind != MSG:
                continue
            try:
                msg = json.loads(payload)
            except ValueError:
                continue
            if isinstance(msg, dict):
                handle(port, rid, msg)


main()
'''

FAKE_AGENT: Final[str] = f"MALFORMED = {MALFORMED!r}\n{_FAKE_AGENT_BODY}"
"""Source of the fake agent; run as ``python3 fake_agent.py MODE``."""

FAKE_AGENT_PATH = "/tmp/fake_agent.py"
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / MIB
    except (OSError, IndexError, ValueError):
        return 0.0


def process_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def malformed_calls(sb: Sandbox) -> dict[str, Callable[[], object]]:
    """One call per ``MALFORMED`` key: what makes the host send that request op."""
    return {
        "exec": lambda: sb.commands.run("true", timeout=5),
        "stat": lambda: sb.files.stat("/x"),
        "list": lambda: sb.files.list("/"),
        "read_file": lambda: sb.files.read("/x"),
        "write_file": lambda: sb.files.write("/x", b"y"),
        "other": lambda: sb.files.make_dir("/d"),
    }


async def take_port_async(sb: AsyncSandbox, mode: str, timeout: float = 30.0) -> None:
    """Replace ``sb``'s guest agent by the fake one in ``mode``; return once it answers."""
    await sb.files.write(FAKE_AGENT_PATH, FAKE_AGENT)
    # as root: the user account cannot touch the agent (but has sudo: code can)
    await sb.commands.start(["python3", FAKE_AGENT_PATH, mode], timeout=None, user="root")
    deadline = time.monotonic() + timeout
    while True:
        agent = sb._agent
        if agent is not None:
            try:
                if (await agent.call("ping", timeout=1.0)).get("fake") is True:
                    return
            except NovaSandboxError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fake agent ({mode}) did not take the port in {timeout} s")
        await asyncio.sleep(0.05)


def take_port(sb: Sandbox, mode: str, timeout: float = 30.0) -> None:
    """``take_port_async`` for a sync sandbox."""
    _Portal.call(take_port_async(sb._inner, mode, timeout))


def agent_pid(sb: Sandbox | AsyncSandbox) -> int:
    """The guest agent's pid, as its handshake reported it."""
    agent = (sb._inner if isinstance(sb, Sandbox) else sb)._agent
    assert agent is not None, "the sandbox has no agent connection"
    return int(agent.info["pid"])


async def stop_agent_soon_async(sb: AsyncSandbox, delay: float = 0.3) -> None:
    """SIGSTOP the guest agent ``delay`` seconds from now (from a command it started)."""
    await sb.commands.start(f"sleep {delay}; kill -STOP {agent_pid(sb)}", timeout=None, user="root")


def stop_agent_soon(sb: Sandbox, delay: float = 0.3) -> None:
    """``stop_agent_soon_async`` for a sync sandbox."""
    _Portal.call(stop_agent_soon_async(sb._inner, delay))
