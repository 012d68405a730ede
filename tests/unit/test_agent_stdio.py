"""The real guest agent, run on the host with ``agent.py --stdio``, spoken to over pipes.

No VM is booted: the agent serves one connection on stdin/stdout, exactly the code that
serves the virtio port inside the guest. Every agent process is killed at teardown.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from novasandbox.guest.protocol import (
    CHUNK_SIZE,
    MESSAGE_WINDOW,
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    FrameDecoder,
    Kind,
    check_reply,
    encode_frame,
    encode_message,
)

AGENT = Path(__file__).resolve().parents[2] / "src" / "novasandbox" / "guest" / "agent.py"
TIMEOUT = 15.0


@dataclass
class ExecResult:
    started: dict[str, Any]
    stdout: bytes
    stderr: bytes
    exit: dict[str, Any]
    frames: list[Frame] = field(default_factory=list)


class AgentConn:
    """A host-side client for one ``agent.py --stdio`` process."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._w = proc.stdin.fileno()
        self._r = proc.stdout.fileno()
        self._decoder = FrameDecoder()
        self._queues: dict[int, deque[Frame]] = defaultdict(deque)
        self._next_id = 100
        self.eof = False
        self.pids: list[int] = []
        """Pids of started commands: each leads its own process group."""

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # --- sending

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view) :]

    def send(self, rid: int, op: str, **fields: Any) -> None:
        self.write(encode_message(rid, op, **fields))

    def send_frame(self, rid: int, kind: Kind, payload: bytes = b"") -> None:
        self.write(encode_frame(rid, kind, payload))

    # --- receiving

    def _pump(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the agent did not answer in time")
        ready, _, _ = select.select([self._r], [], [], remaining)
        if not ready:
            raise TimeoutError("the agent did not answer in time")
        data = os.read(self._r, 1 << 20)
        if not data:
            self.eof = True
            raise EOFError("the agent closed its stdout")
        for frame in self._decoder.feed(data):
            if frame.kind is Kind.MSG and frame.message()["op"] == "error":
                # every error the agent sends in any test: a code of the table
                code = frame.message()["code"]
                assert code in set(ErrorCode), f"the agent sent an unknown error code {code!r}"
            self._queues[frame.request_id].append(frame)

    def frame(self, rid: int, timeout: float = TIMEOUT) -> Frame:
        """The next frame for request ``rid`` (frames of other requests are kept)."""
        deadline = time.monotonic() + timeout
        while not self._queues[rid]:
            self._pump(deadline)
        return self._queues[rid].popleft()

    def message(self, rid: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = self.frame(rid, timeout)
        assert frame.kind is Kind.MSG, f"expected a message, got {frame}"
        return frame.message()

    def call(self, op: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        rid = self.new_id()
        self.send(rid, op, **fields)
        return self.message(rid, timeout)

    def start(self, argv: list[str], stdin: bytes | None = None, **fields: Any) -> int:
        """Send an exec (and its whole stdin, then EOF, at once, as the host does)."""
        rid = self.new_id()
        self.send(rid, "exec", argv=argv, stdin=stdin is not None, **fields)
        if stdin is not None:
            for i in range(0, len(stdin), CHUNK_SIZE):
                self.send_frame(rid, Kind.STDIN, stdin[i : i + CHUNK_SIZE])
            self.send_frame(rid, Kind.STDIN, b"")
        return rid

    def started(self, rid: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The reply to an exec: ``started`` (its pid is remembered) or an error."""
        msg = self.message(rid, timeout)
        if msg["op"] == "started":
            self.pids.append(msg["pid"])
        return msg

    def finish(
        self, rid: int, timeout: float = TIMEOUT, started: dict[str, Any] | None = None
    ) -> ExecResult:
        started = started or self.started(rid, timeout)
        if started["op"] == "error":
            return ExecResult(started, b"", b"", started)
        assert started["op"] == "started", started
        out, err, frames = bytearray(), bytearray(), []
        while True:
            frame = self.frame(rid, timeout)
            frames.append(frame)
            if frame.kind is Kind.STDOUT:
                out += frame.payload
            elif frame.kind is Kind.STDERR:
                err += frame.payload
            else:
                msg = frame.message()
                assert msg["op"] == "exit", msg
                return ExecResult(started, bytes(out), bytes(err), msg, frames)

    def exec(self, argv: list[str], stdin: bytes | None = None, **fields: Any) -> ExecResult:
        return self.finish(self.start(argv, stdin, **fields))

    def write_file(self, path: str | Path, data: bytes, **fields: Any) -> dict[str, Any]:
        rid = self.new_id()
        self.send(rid, "write_file", path=str(path), **fields)
        for i in range(0, len(data), CHUNK_SIZE):
            self.send_frame(rid, Kind.DATA, data[i : i + CHUNK_SIZE])
        self.send(rid, "end")
        return self.message(rid)

    def listing(
        self, path: str | Path, **fields: Any
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """A ``list`` request's entries (its ``entries`` batches, acknowledged as the host
        does) and its last reply."""
        rid = self.new_id()
        self.send(rid, "list", path=str(path), **fields)
        entries: list[dict[str, Any]] = []
        while (msg := self.message(rid))["op"] == "entries":
            check_reply("list", msg)
            entries.extend(msg["entries"])
            self.send(rid, "ack", bytes=1)
        return entries, msg

    def read_file(self, path: str | Path) -> tuple[bytes, dict[str, Any]]:
        rid = self.new_id()
        self.send(rid, "read_file", path=str(path))
        chunks = []
        while True:
            frame = self.frame(rid)
            if frame.kind is Kind.DATA:
                assert len(frame.payload) <= CHUNK_SIZE
                chunks.append(frame.payload)
                continue
            return b"".join(chunks), frame.message()


def start_agent(agent: Path = AGENT) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(agent), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def agent() -> Iterator[AgentConn]:
    proc = start_agent()
    conn = AgentConn(proc)
    try:
        yield conn
    finally:
        stop_agent(proc)
        # commands run in their own sessions: a failed test must not leave them behind
        for pid in conn.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def error_code(msg: dict[str, Any]) -> ErrorCode:
    assert msg["op"] == "error", msg
    assert isinstance(msg["message"], str) and msg["message"]
    return ErrorCode(msg["code"])  # one of the table's


def test_the_agent_sends_only_the_codes_of_the_table_and_uses_them_all() -> None:
    """Read from the agent's source: every error code it can send is an ``ErrorCode``
    member (none spelled as a string), and every member is one it sends."""
    tree = ast.parse(AGENT.read_text())
    values = {code.value for code in ErrorCode}
    used: set[str] = set()
    error_replies = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in values, f"line {node.lineno}: code spelled as a string"
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "ErrorCode"
        ):
            assert node.attr in ErrorCode.__members__, f"line {node.lineno}: {node.attr}"
            used.add(ErrorCode[node.attr].value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "reply" and any(
                isinstance(a, ast.Constant) and a.value == "error" for a in node.args
            ):
                error_replies += 1
            if node.func.attr == "reply_error":
                for kw in node.keywords:
                    if kw.arg == "code":
                        # a member, or a _Refused's (itself built from a member)
                        assert ast.unparse(kw.value).startswith(("ErrorCode.", "exc.code"))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "_Refused":
            assert ast.unparse(node.args[0]).startswith("ErrorCode."), node.lineno
    assert error_replies == 1, "error replies are sent by reply_error alone"
    assert used == values, f"codes in the table the agent never sends: {values - used}"


def pid_gone(pid: int) -> bool:
    """True once ``pid`` does not exist or is a zombie (dead, awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# ---------------------------------------------------------------------------- connection


def test_hello(agent: AgentConn) -> None:
    reply = agent.call("hello", version=PROTOCOL_VERSION)
    assert reply["op"] == "hello"
    assert reply["version"] == PROTOCOL_VERSION
    assert reply["pid"] == agent.proc.pid
    assert reply["user"] == "root"  # no template.json beside it: root
    assert reply["kernel"] == os.uname().release
    assert type(reply["hello_us"]) is int and reply["hello_us"] >= 0


def test_sync_flushes_without_freezing(agent: AgentConn, tmp_path: Path) -> None:
    """Before a snapshot the host asks for a flush (``sync``), not a freeze (outside a
    VM the agent never drops the caches); writes go on through it."""
    assert agent.call("sync", drop_caches=False)["op"] == "ok"
    assert agent.call("sync")["op"] == "ok"
    target = tmp_path / "after-sync"
    assert agent.exec(["sh", "-c", f"echo ok > {target}"]).exit["exit_code"] == 0
    assert target.read_text() == "ok\n"


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, 0, None, "1"])
def test_hello_version_mismatch(agent: AgentConn, version: Any) -> None:
    reply = agent.call("hello", version=version)
    assert error_code(reply) == "version-mismatch"
    # the agent keeps serving
    assert agent.call("ping")["op"] == "pong"


def test_unknown_op(agent: AgentConn) -> None:
    assert error_code(agent.call("frobnicate")) == "unknown-op"
    assert agent.call("ping")["op"] == "pong"


def test_invalid_message_gets_a_protocol_error_reply(agent: AgentConn) -> None:
    agent.send_frame(7, Kind.MSG, b"[not an object]")
    assert error_code(agent.message(7)) == "protocol-error"
    agent.send_frame(8, Kind.STDOUT, b"host cannot send this")
    assert error_code(agent.message(8)) == "protocol-error"
    assert agent.call("ping")["op"] == "pong"


def test_bad_request_fields(agent: AgentConn) -> None:
    assert error_code(agent.call("exec", argv=[])) == "bad-request"
    assert error_code(agent.call("exec", argv="echo hi")) == "bad-request"
    assert error_code(agent.call("exec")) == "bad-request"
    assert error_code(agent.call("stat", path="relative/path")) == "bad-request"
    assert error_code(agent.call("stat", path="/a\0b")) == "bad-request"
    assert error_code(agent.call("signal", target="x", signal=9)) == "bad-request"


def test_eof_on_stdin_ends_the_agent(agent: AgentConn) -> None:
    assert agent.proc.stdin is not None
    agent.proc.stdin.close()
    assert agent.proc.wait(timeout=TIMEOUT) == 0


def test_shutdown(agent: AgentConn) -> None:
    assert agent.call("shutdown")["op"] == "ok"
    assert agent.proc.wait(timeout=TIMEOUT) == 0


# ---------------------------------------------------------------------------- commands


def test_exec_stdout_and_exit_code(agent: AgentConn) -> None:
    result = agent.exec(["echo", "hello", "world"])
    assert isinstance(result.started["pid"], int)
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.exit == {
        "op": "exit",
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
    }


def test_exec_stderr_and_nonzero_exit(agent: AgentConn) -> None:
    result = agent.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.exit["exit_code"] == 3
    assert result.exit["signal"] is None


def test_exec_env_and_default_path(agent: AgentConn) -> None:
    result = agent.exec(
        ["sh", "-c", 'printf "%s|%s|%s" "$FOO" "$EMPTY" "$PATH"'],
        env={"FOO": "bar baz", "EMPTY": ""},
    )
    foo, empty, path = result.stdout.decode().split("|")
    assert (foo, empty) == ("bar baz", "")
    assert "/usr/bin" in path.split(":")
    # the host's environment does not leak into commands
    leak = agent.exec(["sh", "-c", 'printf "%s" "${PYTEST_CURRENT_TEST-unset}"'])
    assert leak.stdout == b"unset"


def test_template_env_is_under_the_requests_env(tmp_path: Path) -> None:
    """An image's template.json (beside the agent) sets the commands' default environment:
    over the agent's built-in defaults, under what the host sends with the request."""
    for name in ("agent.py", "protocol.py"):
        shutil.copyfile(AGENT.parent / name, tmp_path / name)
    (tmp_path / "template.json").write_text(
        json.dumps({"env": {"PATH": f"/opt/v/bin:{os.defpath}:/usr/bin:/bin", "T": "t", "U": "u"}})
    )
    proc = start_agent(tmp_path / "agent.py")
    conn = AgentConn(proc)
    try:
        probe = ["sh", "-c", 'printf "%s|%s|%s|%s" "$PATH" "$T" "$U" "$HOME"']
        path, t, u, home = conn.exec(probe, env={"U": "call"}).stdout.decode().split("|")
        assert path.split(":")[0] == "/opt/v/bin"
        assert (t, u, home) == ("t", "call", "/root")
        path, t, _, _ = conn.exec(probe, env={"PATH": "/bin:/usr/bin"}).stdout.decode().split("|")
        assert (path, t) == ("/bin:/usr/bin", "t")
    finally:
        stop_agent(proc)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1, 2]",
        b'{"env": ["PATH"]}',
        b'{"env": {"PATH": 3}}',
        b'{"env": {"A=B": "x"}}',
        b'{"env": {"": "x"}}',
        b'{"env": {"A": "x\\u0000y"}}',
        b"\xff\xfe",
        b'{"env": {"A": "' + b"x" * 70_000 + b'"}}',
    ],
)
def test_unusable_template_defaults_are_ignored(tmp_path: Path, content: bytes) -> None:
    from novasandbox.guest import agent as agent_module

    path = tmp_path / "template.json"
    path.write_bytes(content)
    assert agent_module.load_template_env(str(path)) == {}
    assert agent_module.load_template_env(str(tmp_path / "absent.json")) == {}
    path.write_bytes(b'{"env": {"A": "1", "B": ""}}')
    assert agent_module.load_template_env(str(path)) == {"A": "1", "B": ""}


def test_exec_cwd(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("")
    result = agent.exec(["sh", "-c", "pwd; ls"], cwd=str(tmp_path))
    assert result.stdout.decode().splitlines() == [str(tmp_path), "marker"]


def test_exec_invalid_cwd(agent: AgentConn, tmp_path: Path) -> None:
    result = agent.exec(["true"], cwd=str(tmp_path / "missing"))
    assert error_code(result.exit) == "invalid-cwd"


@pytest.mark.parametrize("argv0", ["novasandbox-no-such-command", "/nonexistent/bin/tool"])
def test_command_not_found(agent: AgentConn, argv0: str) -> None:
    result = agent.exec([argv0, "arg"])
    assert error_code(result.exit) == "command-not-found"
    assert argv0 in result.exit["message"]


def test_command_not_executable(agent: AgentConn, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)  # no x bit: EACCES even for root
    result = agent.exec([str(script)])
    assert error_code(result.exit) == "permission-denied"


def test_exec_stdin(agent: AgentConn) -> None:
    data = b"line one\nline two\n" + bytes(range(256)) * 3000  # > 2 chunks
    result = agent.exec(["cat"], stdin=data)
    assert result.stdout == data
    assert result.exit["exit_code"] == 0


def test_exec_stdin_in_several_frames(agent: AgentConn) -> None:
    rid = agent.new_id()
    agent.send(rid, "exec", argv=["sh", "-c", "tr a-z A-Z; echo done"], stdin=True)
    for part in (b"hello ", b"", b"world\n"):
        if part:
            agent.send_frame(rid, Kind.STDIN, part)
    agent.send_frame(rid, Kind.STDIN, b"")  # EOF
    result = agent.finish(rid)
    assert result.stdout == b"HELLO WORLD\ndone\n"


def test_exec_without_stdin_reads_dev_null(agent: AgentConn) -> None:
    result = agent.exec(["cat"], timeout=5)
    assert result.stdout == b""
    assert result.exit["timed_out"] is False


def test_large_output_is_chunked_and_complete(agent: AgentConn) -> None:
    size = 3 * CHUNK_SIZE + 123
    result = agent.exec(["head", "-c", str(size), "/dev/urandom"])
    assert len(result.stdout) == size
    assert all(len(f.payload) <= CHUNK_SIZE for f in result.frames)


def test_killed_by_signal(agent: AgentConn) -> None:
    result = agent.exec(["sh", "-c", "kill -KILL $$"])
    assert result.exit["signal"] == signal.SIGKILL
    assert result.exit["exit_code"] == 128 + signal.SIGKILL
    assert result.exit["timed_out"] is False


def test_timeout_kills_the_whole_process_group(agent: AgentConn, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # a background child that ignores SIGTERM (the ignore survives its exec of sleep)
    script = (
        f'sh -c \'trap "" TERM; echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; '
        "exec sleep 60' & "
        f"while [ ! -e {pidfile} ]; do sleep 0.01; done; echo started; wait"
    )
    t0 = time.monotonic()
    result = agent.exec(["sh", "-c", script], timeout=1.5)
    elapsed = time.monotonic() - t0
    assert result.stdout == b"started\n"
    assert result.exit["timed_out"] is True
    assert result.exit["signal"] == signal.SIGKILL
    assert result.exit["exit_code"] == 128 + signal.SIGKILL
    assert 1.4 <= elapsed < 30
    child = int(pidfile.read_text())
    assert wait_until(lambda: pid_gone(child)), f"child {child} survived the timeout"


def test_signal_op(agent: AgentConn) -> None:
    rid = agent.start(["sleep", "30"])
    assert agent.started(rid)["op"] == "started"
    reply = agent.call("signal", target=rid, signal=int(signal.SIGTERM))
    assert reply["op"] == "ok"
    exit_msg = agent.message(rid)
    assert exit_msg["op"] == "exit"
    assert exit_msg["signal"] == signal.SIGTERM
    assert exit_msg["exit_code"] == 128 + signal.SIGTERM


def test_signal_unknown_target(agent: AgentConn) -> None:
    assert error_code(agent.call("signal", target=424242, signal=9)) == "no-such-process"


def test_commands_run_concurrently(agent: AgentConn, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    # the first command waits for a file that is only created once the second one is done:
    # an agent that ran commands one at a time would never finish the second
    slow = agent.start(["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.01; done; echo slow"])
    fast = agent.start(["sh", "-c", "echo fast"])
    assert agent.finish(fast).stdout == b"fast\n"
    flag.touch()
    assert agent.finish(slow).stdout == b"slow\n"


# ---------------------------------------------------------------------------- files


def test_write_then_read_round_trip(agent: AgentConn, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 4321)
    target = tmp_path / "blob.bin"
    reply = agent.write_file(target, data)
    assert (reply["op"], reply["size"]) == ("ok", len(data))
    assert reply["stat"]["path"] == str(target) and reply["stat"]["size"] == len(data)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    back, done = agent.read_file(target)
    assert done == {"op": "ok", "size": len(data)}
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()


def test_write_empty_file(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.write_bytes(b"old contents")
    assert agent.write_file(target, b"")["size"] == 0
    assert target.read_bytes() == b""
    assert agent.read_file(target) == (b"", {"op": "ok", "size": 0})


def test_write_replaces_append_appends(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    agent.write_file(target, b"first version, long\n")
    agent.write_file(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    agent.write_file(target, b"third\n", append=True)
    assert target.read_bytes() == b"second\nthird\n"


def test_write_with_parents_and_mode(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "secret"
    assert agent.write_file(target, b"x", parents=True, mode=0o600)["op"] == "ok"
    assert target.read_bytes() == b"x"
    assert target.stat().st_mode & 0o777 == 0o600


def test_write_into_missing_directory(agent: AgentConn, tmp_path: Path) -> None:
    reply = agent.write_file(tmp_path / "missing" / "f", b"data")
    assert error_code(reply) == "file-not-found"
    assert reply["errno"] == 2


def test_end_without_upload(agent: AgentConn) -> None:
    assert error_code(agent.call("end")) == "bad-request"


def test_read_errors(agent: AgentConn, tmp_path: Path) -> None:
    _, reply = agent.read_file(tmp_path / "missing")
    assert error_code(reply) == "file-not-found"
    _, reply = agent.read_file(tmp_path)
    assert error_code(reply) == "is-a-directory"


def test_stat(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"12345")
    target.chmod(0o640)
    st = agent.call("stat", path=str(target))["stat"]
    assert st["name"] == "f.txt"
    assert st["path"] == str(target)
    assert (st["type"], st["size"], st["mode"]) == ("file", 5, 0o640)
    assert abs(st["mtime"] - target.stat().st_mtime) < 1e-3
    assert agent.call("stat", path=str(tmp_path))["stat"]["type"] == "dir"
    assert agent.call("stat", path="/")["stat"]["name"] == "/"
    assert error_code(agent.call("stat", path=str(tmp_path / "nope"))) == "file-not-found"


def test_list(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"bb")
    (tmp_path / "a").mkdir()
    (tmp_path / "c").symlink_to(tmp_path / "b.txt")
    entries, done = agent.listing(tmp_path)
    assert done == {"op": "ok", "count": 3, "truncated": False}
    assert [(e["name"], e["type"]) for e in entries] == [
        ("a", "dir"),
        ("b.txt", "file"),
        ("c", "symlink"),
    ]
    assert entries[1]["size"] == 2
    assert entries[1]["path"] == str(tmp_path / "b.txt")
    assert agent.listing(tmp_path / "a")[0] == []
    assert error_code(agent.call("list", path=str(tmp_path / "b.txt"))) == "not-a-directory"
    assert error_code(agent.call("list", path=str(tmp_path / "nope"))) == "file-not-found"


def test_mkdir(agent: AgentConn, tmp_path: Path) -> None:
    deep = tmp_path / "x" / "y" / "z"
    assert agent.call("mkdir", path=str(deep)) == {"op": "ok", "created": True}
    assert deep.is_dir()
    # exist_ok by default
    assert agent.call("mkdir", path=str(deep)) == {"op": "ok", "created": False}
    assert error_code(agent.call("mkdir", path=str(deep), exist_ok=False)) == "file-exists"
    reply = agent.call("mkdir", path=str(tmp_path / "p" / "q"), parents=False)
    assert error_code(reply) == "file-not-found"


def test_remove(agent: AgentConn, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "leaf").write_text("y")
    assert agent.call("remove", path=str(f))["op"] == "ok"
    assert not f.exists()
    reply = agent.call("remove", path=str(tree), recursive=False)
    assert error_code(reply) == "directory-not-empty"
    assert tree.exists()
    assert agent.call("remove", path=str(tree))["op"] == "ok"
    assert not tree.exists()
    assert error_code(agent.call("remove", path=str(f))) == "file-not-found"


def test_remove_symlink_removes_only_the_link(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep").write_text("k")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert agent.call("remove", path=str(link))["op"] == "ok"
    assert not link.exists() and not link.is_symlink()
    assert (target / "keep").read_text() == "k"


def test_file_ops_interleave_with_a_running_command(agent: AgentConn, tmp_path: Path) -> None:
    rid = agent.start(["sh", "-c", "sleep 0.5; echo ok"])
    assert agent.write_file(tmp_path / "f", b"during")["op"] == "ok"
    assert agent.read_file(tmp_path / "f")[0] == b"during"
    assert agent.finish(rid).stdout == b"ok\n"


# ---------------------------------------------------------------------------- regressions
# Each of these once failed against a real bug (found by these tests, since fixed).


def test_output_is_complete_when_the_host_reads_slowly(agent: AgentConn, tmp_path: Path) -> None:
    # The host reads nothing for a while. The first part is more than the agent's stdout
    # pipe holds (64 KiB), so the agent ends up blocked sending it; the tail is written a
    # second later, while it is blocked, and the command exits.
    pidfile = tmp_path / "pid"
    script = (
        f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
        "head -c 70000 /dev/zero; sleep 1; echo TAIL"
    )
    rid = agent.start(["sh", "-c", script])
    assert wait_until(pidfile.exists, TIMEOUT)
    pid = int(pidfile.read_text())
    assert wait_until(lambda: pid_gone(pid), TIMEOUT)
    time.sleep(0.5)  # the host is still busy for a while after the command exited
    stdout = agent.finish(rid).stdout
    assert len(stdout) == 70005
    assert stdout.endswith(b"\0TAIL\n")


def test_background_output_never_lands_in_a_later_command(agent: AgentConn, tmp_path: Path) -> None:
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    # a background child keeps the first command's pipes open past its exit
    first = agent.start(
        ["sh", "-c", f"(while [ ! -e {go1} ]; do sleep 0.01; done; echo late) & echo first"]
    )
    assert agent.finish(first).stdout == b"first\n"
    second = agent.start(
        [
            "sh",
            "-c",
            f"while [ ! -e {go2} ]; do sleep 0.01; done; "
            "echo one; sleep 0.1; echo two; sleep 0.1; echo three",
        ]
    )
    started = agent.started(second)
    # the background child writes now, after the second command's pipes exist
    go1.touch()
    with contextlib.suppress(TimeoutError):
        agent.frame(first, timeout=2.0)  # (a fixed agent sends nothing after "exit")
    time.sleep(0.2)
    go2.touch()
    assert agent.finish(second, started=started).stdout == b"one\ntwo\nthree\n"


def test_malformed_exec_always_gets_a_reply(agent: AgentConn) -> None:
    rid = agent.start(["true"], env=["NOT", "A", "MAPPING"])
    assert error_code(agent.message(rid, timeout=3)) == "bad-request"


def test_list_directory_with_non_utf8_name(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("")
    open(os.fsencode(tmp_path) + b"/bad\xff", "w").close()
    entries, reply = agent.listing(tmp_path)
    assert reply["op"] == "ok", reply
    assert sorted(e["name"] for e in entries) == ["bad\\xff", "ok.txt"]


# ---------------------------------------------------------------------------- accounts
#
# The agent runs as root here too (the suite runs as root), so it can act as another
# account of the host: ``nobody`` stands in for the guest's ``user``.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another account needs root")
NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every account may write in (tmp_path's parents are root's alone)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ns-accounts-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _agent_thread_ids(pid: int) -> set[tuple[str, str]]:
    """The (Uid, Gid) lines of every thread of the agent process."""
    ids = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            lines = Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines()
        except FileNotFoundError:
            continue  # a thread that just ended
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        ids.add((fields["Uid"].split()[0], fields["Gid"].split()[0]))
    return ids


@needs_root
def test_exec_as_another_account_gets_its_ids_home_and_environment(agent: AgentConn) -> None:
    probe = [
        "sh",
        "-c",
        'id -u; id -g; id -G; printf "%s|%s|%s|%s\\n" "$HOME" "$USER" "$LOGNAME" "$SHELL"; pwd',
    ]
    r = agent.exec(probe, user="nobody")
    uid, gid, groups, names, cwd = r.stdout.decode().splitlines()
    assert (int(uid), int(gid), int(groups)) == (NOBODY, 65534, 65534)
    import pwd

    pw = pwd.getpwnam("nobody")
    assert names == f"{pw.pw_dir}|nobody|nobody|{pw.pw_shell}"
    assert cwd == (pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")  # its home, or /
    # the next command (no user: the default, root outside an image) is root again
    assert agent.exec(["id", "-u"]).stdout == b"0\n"
    assert agent.exec(["id", "-u"], user="root").stdout == b"0\n"
    # and no thread of the agent kept another account's ids
    assert _agent_thread_ids(agent.proc.pid) == {("0", "0")}


@needs_root
def test_concurrent_commands_each_run_as_their_own_account(agent: AgentConn) -> None:
    users = ["nobody", "root"] * 4
    rids = [agent.start(["sh", "-c", "sleep 0.2; id -u"], user=u) for u in users]
    got = [int(agent.finish(rid).stdout) for rid in rids]
    assert got == [NOBODY if u == "nobody" else 0 for u in users]
    assert _agent_thread_ids(agent.proc.pid) == {("0", "0")}


@needs_root
def test_a_working_directory_the_account_may_not_enter(agent: AgentConn, tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = agent.exec(["true"], user="nobody", cwd=str(private))
    assert error_code(result.exit) == "invalid-cwd"
    assert "nobody" in result.exit["message"]
    assert agent.exec(["pwd"], cwd=str(private)).stdout.decode().strip() == str(private)


@needs_root
def test_files_as_another_account_obey_its_permissions_and_belong_to_it(
    agent: AgentConn, shared_dir: Path
) -> None:
    mine = shared_dir / "sub" / "mine.txt"
    assert agent.write_file(mine, b"hi", user="nobody", parents=True)["op"] == "ok"
    assert (mine.stat().st_uid, mine.stat().st_gid) == (NOBODY, 65534)
    assert mine.parent.stat().st_uid == NOBODY  # the parent it made is its own too
    assert agent.call("mkdir", path=str(shared_dir / "d"), user="nobody")["op"] == "ok"
    assert (shared_dir / "d").stat().st_uid == NOBODY
    stat = agent.call("stat", path=str(mine), user="nobody")
    assert stat["stat"]["size"] == 2
    # root's things: refused to nobody, allowed to root
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    secret = shared_dir / "secret"
    secret.write_bytes(b"s")
    secret.chmod(0o600)
    refused = [
        agent.write_file(private / "x", b"x", user="nobody"),
        agent.call("list", path=str(private), user="nobody"),
        agent.call("mkdir", path=str(private / "d"), user="nobody"),
        agent.call("remove", path=str(secret), user="nobody"),  # sticky dir, root's file
    ]
    rid = agent.new_id()
    agent.send(rid, "read_file", path=str(secret), user="nobody")
    refused.append(agent.message(rid))
    assert [error_code(r) for r in refused] == ["permission-denied"] * 5
    assert secret.exists() and not (private / "x").exists()
    assert agent.write_file(private / "x", b"x")["op"] == "ok"  # root (the default)
    assert (private / "x").stat().st_uid == 0
    assert agent.read_file(secret)[0] == b"s"
    assert _agent_thread_ids(agent.proc.pid) == {("0", "0")}


@pytest.mark.parametrize("user", [123, "", "a b", "../x", "Root", "x" * 33, ["root"]])
def test_a_malformed_user_is_a_bad_request(agent: AgentConn, user: Any, tmp_path: Path) -> None:
    assert error_code(agent.exec(["true"], user=user).exit) == "bad-request"
    assert error_code(agent.call("stat", path=str(tmp_path), user=user)) == "bad-request"


def test_an_unknown_account_is_refused_with_its_code(agent: AgentConn, tmp_path: Path) -> None:
    result = agent.exec(["true"], user="novasandbox-nosuch")
    assert error_code(result.exit) == "unknown-user"
    assert "novasandbox-nosuch" in result.exit["message"]
    reply = agent.write_file(tmp_path / "f", b"x", user="novasandbox-nosuch")
    assert error_code(reply) == "unknown-user"
    assert not (tmp_path / "f").exists()


def test_outside_a_vm_a_login_shell_runs_as_a_plain_one(agent: AgentConn) -> None:
    """Here the "guest" is this host: ``bash -l`` (how the host runs command strings)
    would run the host account's own profile, so the agent runs plain ``bash`` (in a
    VM it gets NOVASANDBOX_PATH for the image's profile script: the integration tests
    check that PATH survives /etc/profile)."""
    probe = 'shopt -q login_shell && echo login || echo plain; echo "${NOVASANDBOX_PATH-unset}"'
    result = agent.exec(["/bin/bash", "-l", "-c", probe], env={"PATH": "/x:/bin:/usr/bin"})
    assert result.stdout == b"plain\nunset\n", result.stderr


@needs_root
def test_the_template_names_the_default_account(tmp_path: Path) -> None:
    for name in ("agent.py", "protocol.py"):
        shutil.copyfile(AGENT.parent / name, tmp_path / name)
    (tmp_path / "template.json").write_text(json.dumps({"env": {}, "user": "nobody"}))
    proc = start_agent(tmp_path / "agent.py")
    conn = AgentConn(proc)
    try:
        assert conn.call("hello", version=PROTOCOL_VERSION)["user"] == "nobody"
        assert conn.exec(["id", "-u"]).stdout == f"{NOBODY}\n".encode()
        assert conn.exec(["id", "-u"], user="root").stdout == b"0\n"
    finally:
        stop_agent(proc)


@pytest.mark.parametrize("user", ['"Root"', "3", '"a/b"', '""'])
def test_an_unusable_default_user_is_ignored(tmp_path: Path, user: str) -> None:
    from novasandbox.guest import agent as agent_module

    path = tmp_path / "template.json"
    path.write_text(f'{{"env": {{"A": "1"}}, "user": {user}}}')
    assert agent_module.load_template_defaults(str(path)) == ({}, "root", None)
    path.write_text('{"env": {"A": "1"}, "user": "dev"}')
    assert agent_module.load_template_defaults(str(path)) == ({"A": "1"}, "dev", None)
    assert agent_module.load_template_defaults(str(tmp_path / "absent")) == ({}, "root", None)
    path.write_text('{"env": {}, "user": "dev", "workdir": "/srv/app"}')
    assert agent_module.load_template_defaults(str(path)) == ({}, "dev", "/srv/app")
    path.write_text('{"env": {}, "user": "dev", "workdir": "relative"}')
    assert agent_module.load_template_defaults(str(path)) == ({}, "root", None)


# ---------------------------------------------------------------------------- processes by pid


def test_ps_lists_running_commands_with_their_details(agent: AgentConn, tmp_path: Path) -> None:
    rid = agent.start(["sleep", "30"], cwd=str(tmp_path), tag="nap")
    pid = agent.started(rid)["pid"]
    (proc,) = [p for p in agent.call("ps")["processes"] if p["pid"] == pid]
    assert proc["argv"] == ["sleep", "30"]
    assert (proc["cwd"], proc["user"], proc["tag"], proc["stdin"]) == (
        str(tmp_path),
        "root",
        "nap",
        False,
    )
    assert abs(proc["started_at"] - time.time()) < 60
    assert agent.call("signal", pid=pid, signal=9)["op"] == "ok"
    assert agent.finish(rid, started={"op": "started", "pid": pid}).exit["signal"] == 9
    assert pid not in [p["pid"] for p in agent.call("ps")["processes"]]
    assert error_code(agent.call("signal", pid=pid, signal=9)) == "no-such-process"


def test_connect_replays_recent_output_then_streams_live(agent: AgentConn, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = (
        f"echo first; echo err >&2; while [ ! -e {gate} ]; do sleep 0.02; done; echo second; exit 3"
    )
    rid = agent.start(["sh", "-c", script])
    pid = agent.started(rid)["pid"]
    assert wait_until(
        lambda: any(f.payload == b"first\n" for f in agent._queues[rid]) or _pump_some(agent)
    )
    cid = agent.new_id()
    agent.send(cid, "connect", pid=pid)
    started = agent.message(cid)
    assert started == {"op": "started", "pid": pid, "argv": ["sh", "-c", script]}
    gate.write_text("")
    out, err = bytearray(), bytearray()
    while True:
        frame = agent.frame(cid)
        if frame.kind is Kind.STDOUT:
            out += frame.payload
        elif frame.kind is Kind.STDERR:
            err += frame.payload
        else:
            end = frame.message()
            break
    assert (bytes(out), bytes(err)) == (b"first\nsecond\n", b"err\n")
    assert end == {"op": "exit", "exit_code": 3, "signal": None, "timed_out": False, "dropped": 0}
    own = agent.finish(rid, started={"op": "started", "pid": pid})
    assert own.stdout == b"first\nsecond\n" and own.exit["exit_code"] == 3


def _pump_some(agent: AgentConn) -> bool:
    with contextlib.suppress(TimeoutError):
        agent._pump(time.monotonic() + 0.05)
    return False


def test_connect_keeps_only_the_latest_output(agent: AgentConn, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = (
        f"head -c 200000 /dev/zero | tr '\\0' a; echo; echo tail; "
        f"while [ ! -e {gate} ]; do sleep 0.02; done"
    )
    rid = agent.start(["sh", "-c", script])
    pid = agent.started(rid)["pid"]
    seen = bytearray()

    def tail_arrived() -> bool:
        while agent._queues[rid]:
            frame = agent._queues[rid].popleft()
            seen.extend(frame.payload if frame.kind is Kind.STDOUT else b"")
        _pump_some(agent)
        return seen.endswith(b"tail\n")

    assert wait_until(tail_arrived, timeout=15)
    cid = agent.new_id()
    agent.send(cid, "connect", pid=pid)
    assert agent.message(cid)["op"] == "started"
    gate.write_text("")
    replay = bytearray()
    while (frame := agent.frame(cid)).kind is not Kind.MSG:
        replay += frame.payload
    assert len(replay) == 64 * 1024 and replay.endswith(b"a\ntail\n")


def test_stdin_by_pid(agent: AgentConn) -> None:
    rid = agent.new_id()
    agent.send(rid, "exec", argv=["cat"], stdin=True)
    pid = agent.started(rid)["pid"]
    assert agent.call("write_stdin", pid=pid, data="h\u00e9llo \u00ff")["op"] == "ok"
    assert agent.call("close_stdin", pid=pid)["op"] == "ok"
    result = agent.finish(rid, started={"op": "started", "pid": pid})
    assert result.stdout == "h\u00e9llo \u00ff".encode("latin-1")
    # closed now, or never open
    assert error_code(agent.call("write_stdin", pid=pid, data="x")) == "no-such-process"
    rid = agent.start(["sleep", "30"])
    pid = agent.started(rid)["pid"]
    assert error_code(agent.call("write_stdin", pid=pid, data="x")) == "stdin-closed"
    assert error_code(agent.call("close_stdin", pid=pid)) == "stdin-closed"
    agent.call("signal", pid=pid, signal=9)


@pytest.mark.parametrize("pid", [0, -1, "1", 1.5, True, None])
def test_malformed_pids_are_bad_requests(agent: AgentConn, pid: Any) -> None:
    for op, fields in (
        ("connect", {}),
        ("write_stdin", {"data": ""}),
        ("close_stdin", {}),
        ("signal", {"signal": 9}),
    ):
        assert error_code(agent.call(op, pid=pid, **fields)) == "bad-request", op


def test_unknown_pids_are_refused(agent: AgentConn) -> None:
    for op, fields in (("connect", {}), ("write_stdin", {"data": "x"}), ("close_stdin", {})):
        assert error_code(agent.call(op, pid=os.getpid(), **fields)) == "no-such-process", op
    assert error_code(agent.call("exec", argv=["true"], tag=7)) == "bad-request"
    assert error_code(agent.call("exec", argv=["true"], tag="x" * 257)) == "bad-request"


# ---------------------------------------------------------------------------- metrics

METRIC_FIELDS = ("cpu_used_pct", "cpu_count", "mem_used", "mem_total", "disk_used", "disk_total")


def test_metrics_are_the_machines_own_figures(agent: AgentConn) -> None:
    """Outside a VM the agent reports the host it runs on: the same CPU count, memory
    total and root file system as this process sees, and a reply the host's schema
    takes."""
    reply = agent.call("metrics")
    assert check_reply("metrics", reply) is reply and reply["op"] == "ok"
    assert reply["cpu_count"] == os.cpu_count()
    assert 0.0 <= reply["cpu_used_pct"] <= 100.0
    meminfo = Path("/proc/meminfo").read_text().split()
    assert reply["mem_total"] == int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    assert 0 < reply["mem_used"] < reply["mem_total"]
    fs = os.statvfs("/")
    assert reply["disk_total"] == fs.f_blocks * fs.f_frsize
    assert 0 < reply["disk_used"] <= reply["disk_total"]


def test_metrics_cpu_window_is_at_least_a_tenth_of_a_second(agent: AgentConn) -> None:
    """The first call samples the CPU for 0.1 s and one at once after it still gets a
    figure (over the rest of the 0.1 s window), and both see a busy child. (How long the
    second waits depends on when it arrives: not asserted, it is timing.)"""
    busy = agent.start(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2: pass"]
    )
    started = agent.started(busy)
    assert started["op"] == "started"
    first = agent.call("metrics")
    second = agent.call("metrics")
    for reply in (first, second):
        check_reply("metrics", reply)
        assert reply["cpu_used_pct"] > 0.0  # the busy child's share at least
    assert agent.finish(busy, started=started).exit["exit_code"] == 0


def test_metrics_ignore_extra_fields_and_run_beside_a_command(agent: AgentConn) -> None:
    rid = agent.start(["sleep", "1"])
    started = agent.started(rid)
    assert started["op"] == "started"
    reply = agent.call("metrics", unexpected={"x": 1})
    assert reply["op"] == "ok" and set(METRIC_FIELDS) <= set(reply)
    assert agent.finish(rid, started=started).exit["exit_code"] == 0


# ---------------------------------------------------------------------------- terminals


def _screen_until(agent: AgentConn, rid: int, wanted: bytes, timeout: float = TIMEOUT) -> bytes:
    """What the terminal of request ``rid`` showed, up to and including ``wanted``."""
    seen = bytearray()
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        frame = agent.frame(rid, max(0.01, deadline - time.monotonic()))
        assert frame.kind is Kind.STDOUT, frame
        seen += frame.payload
    return bytes(seen)


def test_a_terminal_has_its_size_a_tty_and_term(agent: AgentConn) -> None:
    probe = "stty size; tty; echo $TERM; [ -t 0 ] && [ -t 2 ] && echo all-tty"
    result = agent.exec(["sh", "-c", probe], pty={"cols": 100, "rows": 30})
    lines = result.stdout.decode().split("\r\n")
    assert lines[0] == "30 100" and lines[1].startswith("/dev/pts/"), lines
    assert lines[2:4] == ["xterm-256color", "all-tty"]
    assert result.exit["exit_code"] == 0 and result.stderr == b""


def test_a_terminal_echoes_what_is_typed_and_ctrl_d_ends_cat(agent: AgentConn) -> None:
    rid = agent.new_id()
    agent.send(rid, "exec", argv=["cat"], stdin=True, pty={"cols": 80, "rows": 24})
    pid = agent.started(rid)["pid"]
    agent.send_frame(rid, Kind.STDIN, b"hello\n")
    assert _screen_until(agent, rid, b"hello\r\nhello\r\n")  # the echo, then cat's copy
    agent.send_frame(rid, Kind.STDIN, b"\x04")
    assert agent.finish(rid, started={"op": "started", "pid": pid}).exit["exit_code"] == 0


def test_ctrl_c_in_a_terminal_interrupts_its_foreground_program(agent: AgentConn) -> None:
    rid = agent.new_id()
    agent.send(rid, "exec", argv=["sh", "-c", "echo go; exec sleep 30"], stdin=True,
               pty={"cols": 80, "rows": 24})  # fmt: skip
    pid = agent.started(rid)["pid"]
    _screen_until(agent, rid, b"go\r\n")
    time.sleep(0.2)  # sleep has replaced sh
    agent.send_frame(rid, Kind.STDIN, b"\x03")
    end = agent.finish(rid, started={"op": "started", "pid": pid}).exit
    assert (end["signal"], end["exit_code"]) == (signal.SIGINT, 128 + signal.SIGINT)


def test_resize_reaches_the_terminal_and_its_program(agent: AgentConn) -> None:
    script = 'trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
    rid = agent.new_id()
    agent.send(rid, "exec", argv=["bash", "-c", script], stdin=True, pty={"cols": 80, "rows": 24})
    pid = agent.started(rid)["pid"]
    _screen_until(agent, rid, b"ready\r\n")
    assert agent.call("resize", pid=pid, cols=132, rows=43)["op"] == "ok"
    assert b"43 132\r\n" in _screen_until(agent, rid, b"43 132\r\n")
    assert agent.call("signal", pid=pid, signal=9)["op"] == "ok"
    assert agent.finish(rid, started={"op": "started", "pid": pid}).exit["signal"] == 9
    assert error_code(agent.call("resize", pid=pid, cols=80, rows=24)) == "no-such-process"


@pytest.mark.parametrize(
    "size",
    [
        {"cols": 0, "rows": 24},
        {"cols": 80},
        {"cols": 80, "rows": 1001},
        [80, 24],
        7,
        {"cols": True, "rows": 24},
        {"cols": 80.0, "rows": 24},
    ],
)
def test_bad_terminal_sizes_are_bad_requests(agent: AgentConn, size: Any) -> None:
    assert error_code(agent.exec(["true"], pty=size).exit) == "bad-request"


def test_resize_needs_a_terminal(agent: AgentConn) -> None:
    rid = agent.start(["sleep", "30"])
    pid = agent.started(rid)["pid"]
    assert error_code(agent.call("resize", pid=pid, cols=80, rows=24)) == "not-a-terminal"
    assert error_code(agent.call("resize", pid=pid, cols=0, rows=24)) == "bad-request"
    agent.call("signal", pid=pid, signal=9)


def test_a_command_streams_to_at_most_16_connections(agent: AgentConn) -> None:
    rid = agent.start(["sleep", "30"])
    pid = agent.started(rid)["pid"]
    for _ in range(16):
        cid = agent.new_id()
        agent.send(cid, "connect", pid=pid)
        assert agent.message(cid)["op"] == "started"
    assert error_code(agent.call("connect", pid=pid)) == "too-many-connections"
    agent.call("signal", pid=pid, signal=9)


# ---------------------------------------------------------------------------- files, completely


def _entry_keys() -> set[str]:
    return {
        "name",
        "path",
        "type",
        "size",
        "mode",
        "mtime",
        "owner",
        "group",
        "symlink_target",
    }


def test_entries_name_owner_group_and_link_target(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "f").chmod(0o640)
    (tmp_path / "ln").symlink_to("f")
    info = check_reply("stat", agent.call("stat", path=str(tmp_path / "f")))["stat"]
    assert set(info) == _entry_keys()
    uid, gid = os.getuid(), os.getgid()
    import grp
    import pwd

    assert (info["owner"], info["group"]) == (pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name)
    assert (info["mode"], info["size"], info["symlink_target"]) == (0o640, 3, None)
    link = agent.call("stat", path=str(tmp_path / "ln"))["stat"]
    assert (link["type"], link["symlink_target"]) == ("symlink", "f")
    entries, _ = agent.listing(tmp_path)
    assert {e["name"]: e["symlink_target"] for e in entries} == {"f": None, "ln": "f"}


@needs_root
def test_an_id_without_a_name_is_sent_as_its_number(agent: AgentConn, tmp_path: Path) -> None:
    orphan = tmp_path / "orphan"
    orphan.write_text("x")
    os.chown(orphan, 54321, 54322)  # no such account on this host (nor group)
    info = agent.call("stat", path=str(orphan))["stat"]
    assert (info["owner"], info["group"]) == ("54321", "54322")


def test_list_to_a_depth_with_full_paths_and_base_names(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "a" / "one.txt").write_text("1")
    (tmp_path / "top.txt").write_text("t")
    (tmp_path / "loop").symlink_to(tmp_path)  # listed, never followed
    paths = {
        d: sorted(e["path"][len(str(tmp_path)) + 1 :] for e in agent.listing(tmp_path, depth=d)[0])
        for d in (1, 2, 4)
    }
    assert paths[1] == ["a", "loop", "top.txt"]
    assert paths[2] == ["a", "a/b", "a/one.txt", "loop", "top.txt"]
    assert paths[4] == ["a", "a/b", "a/b/c", "a/b/c/deep.txt", "a/one.txt", "loop", "top.txt"]
    deep = next(e for e in agent.listing(tmp_path, depth=4)[0] if e["name"] == "deep.txt")
    assert deep["path"] == str(tmp_path / "a" / "b" / "c" / "deep.txt")
    for bad in (0, 33, "2", True, None):
        assert error_code(agent.call("list", path=str(tmp_path), depth=bad)) == "bad-request"


def test_a_listing_is_streamed_in_batches_and_bounded(agent: AgentConn, tmp_path: Path) -> None:
    for i in range(3000):
        (tmp_path / f"file-with-a-long-enough-name-{i:05}").touch()
    rid = agent.new_id()
    agent.send(rid, "list", path=str(tmp_path))
    # without acknowledgements the agent stops after its window of messages
    batches = [agent.message(rid) for _ in range(MESSAGE_WINDOW)]
    assert all(b["op"] == "entries" for b in batches)
    with pytest.raises(TimeoutError):
        agent.message(rid, timeout=0.5)
    agent.send(rid, "ack", bytes=100)
    got = [e for b in batches for e in b["entries"]]
    while (msg := agent.message(rid))["op"] == "entries":
        got.extend(msg["entries"])
    assert msg == {"op": "ok", "count": 3000, "truncated": False}
    assert len({e["name"] for e in got}) == 3000
    # at most max_entries, then it says so
    entries, done = agent.listing(tmp_path, max_entries=10)
    assert (len(entries), done) == (10, {"op": "ok", "count": 10, "truncated": True})
    entries, done = agent.listing(tmp_path, max_entries=3000)
    assert (len(entries), done["truncated"]) == (3000, False)


def test_rename_never_replaces(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    reply = agent.call("rename", path=str(tmp_path / "a"), to=str(tmp_path / "b"))
    assert error_code(reply) == "file-exists"
    assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"
    reply = check_reply(
        "rename", agent.call("rename", path=str(tmp_path / "a"), to=str(tmp_path / "c"))
    )
    assert reply["stat"]["path"] == str(tmp_path / "c") and reply["stat"]["name"] == "c"
    assert not (tmp_path / "a").exists() and (tmp_path / "c").read_text() == "a"
    reply = agent.call("rename", path=str(tmp_path / "gone"), to=str(tmp_path / "d"))
    assert error_code(reply) == "file-not-found"
    reply = agent.call("rename", path=str(tmp_path / "c"), to=str(tmp_path / "no" / "d"))
    assert error_code(reply) == "file-not-found"
    assert (
        error_code(agent.call("rename", path=str(tmp_path / "c"), to="relative")) == "bad-request"
    )


def test_mkdir_says_whether_it_created_and_refuses_a_file_in_the_way(
    agent: AgentConn, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        assert error_code(agent.call("mkdir", path=str(path))) == "not-a-directory"
    assert (tmp_path / "file").read_text() == "x"
    assert agent.call("mkdir", path=str(tmp_path / "new" / "sub"))["created"] is True
    assert agent.call("mkdir", path=str(tmp_path / "new"))["created"] is False


@needs_root
def test_rename_and_list_as_another_account(agent: AgentConn, shared_dir: Path) -> None:
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    (private / "x").write_text("x")
    reply = agent.call("rename", path=str(private / "x"), to=str(shared_dir / "y"), user="nobody")
    assert error_code(reply) == "permission-denied"
    assert (private / "x").exists()
    mine = shared_dir / "mine"
    agent.write_file(mine, b"m", user="nobody")
    reply = agent.call("rename", path=str(mine), to=str(shared_dir / "mine2"), user="nobody")
    assert reply["stat"]["owner"] == "nobody"
    # a subdirectory it may not read is listed, not entered
    entries, done = agent.listing(shared_dir, depth=3, user="nobody")
    assert done["op"] == "ok"
    assert str(private) in {e["path"] for e in entries}
    assert str(private / "x") not in {e["path"] for e in entries}
    assert error_code(agent.call("list", path=str(private), user="nobody")) == "permission-denied"


class Watch:
    """One ``watch_dir`` request of the agent, read as the host reads it."""

    def __init__(self, agent: AgentConn, path: Path, **fields: Any) -> None:
        self.agent = agent
        self.rid = agent.new_id()
        agent.send(self.rid, "watch_dir", path=str(path), **fields)
        self.first = agent.message(self.rid)
        self.dropped = 0
        self.ended: dict[str, Any] | None = None

    def events(self, until: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        """Events as they come (acknowledged), until ``until`` of them or ``timeout``."""
        got: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while len(got) < until and self.ended is None:
            try:
                msg = self.agent.message(self.rid, timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            check_reply("watch_dir", msg)
            if msg["op"] == "ok":
                self.ended = msg
                break
            got.extend((e["name"], e["type"]) for e in msg["events"])
            self.dropped += msg["dropped"]
            self.agent.send(self.rid, "ack", bytes=1)
        return got

    def stop(self) -> dict[str, Any]:
        self.agent.send(self.rid, "cancel")
        while self.ended is None:
            msg = self.agent.message(self.rid)
            if msg["op"] == "ok":
                self.ended = msg
        return self.ended


def _inotify_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
    return count


def test_watch_reports_each_kind_of_change_and_stop_frees_it(
    agent: AgentConn, tmp_path: Path
) -> None:
    (tmp_path / "old").write_text("o")
    watch = Watch(agent, tmp_path)
    assert watch.first == {"op": "watching", "watches": 1}
    assert _inotify_fds(agent.proc.pid) == 1
    (tmp_path / "new").write_text("n")  # create + write
    (tmp_path / "old").chmod(0o600)
    (tmp_path / "old").rename(tmp_path / "moved")
    (tmp_path / "moved").unlink()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "not-seen").write_text("x")  # not recursive
    got = watch.events(until=7)
    assert got == [
        ("new", "create"),
        ("new", "write"),
        ("old", "chmod"),
        ("old", "rename"),
        ("moved", "create"),
        ("moved", "remove"),
        ("sub", "create"),
    ]
    assert watch.stop() == {"op": "ok", "dropped": 0}
    assert _inotify_fds(agent.proc.pid) == 0  # closed before the last reply
    assert agent.call("ping")["op"] == "pong"


def test_a_recursive_watch_follows_new_subdirectories(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    watch = Watch(agent, tmp_path, recursive=True)
    assert watch.first == {"op": "watching", "watches": 3}
    (tmp_path / "a" / "b" / "f").write_text("x")
    assert watch.events(until=2) == [("a/b/f", "create"), ("a/b/f", "write")]
    (tmp_path / "later").mkdir()
    assert watch.events(until=1) == [("later", "create")]
    (tmp_path / "later" / "g").touch()
    assert watch.events(until=1) == [("later/g", "create")]
    watch.stop()


def test_a_watch_ends_when_its_directory_goes(agent: AgentConn, tmp_path: Path) -> None:
    target = tmp_path / "w"
    target.mkdir()
    watch = Watch(agent, target)
    (target / "f").touch()
    target.joinpath("f").unlink()
    target.rmdir()
    got = watch.events(until=10)
    assert got[:2] == [("f", "create"), ("f", "remove")]
    assert watch.ended == {"op": "ok", "dropped": 0}
    assert _inotify_fds(agent.proc.pid) == 0


def test_a_watch_without_acknowledgements_drops_the_oldest_and_counts(
    agent: AgentConn, tmp_path: Path
) -> None:
    watch = Watch(agent, tmp_path)
    names = [f"{i:05}-" + "n" * 240 for i in range(30000)]
    for name in names:
        (tmp_path / name).touch()  # create (attrib coalesced by the kernel or not)
    time.sleep(0.5)
    # the agent holds at most its window of messages, then queues (bounded) and drops
    first = [agent.message(watch.rid) for _ in range(MESSAGE_WINDOW)]
    with pytest.raises(TimeoutError):
        agent.message(watch.rid, timeout=0.3)
    agent.send(watch.rid, "ack", bytes=MESSAGE_WINDOW)
    got = [e["name"] for m in first for e in m["events"]]
    got += [name for name, _ in watch.events(until=10**6, timeout=2)]
    seen = sum(m["dropped"] for m in first) + watch.dropped
    assert seen > 0 and len(got) + seen >= len(names)
    assert got[-1] == names[-1]  # the newest are kept
    watch.stop()


def test_watch_refuses_what_it_cannot_watch(agent: AgentConn, tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    assert error_code(Watch(agent, tmp_path / "file").first) == "not-a-directory"
    assert error_code(Watch(agent, tmp_path / "nope").first) == "file-not-found"
    assert _inotify_fds(agent.proc.pid) == 0


@needs_root
def test_watch_as_another_account_needs_its_read_permission(
    agent: AgentConn, shared_dir: Path
) -> None:
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    assert error_code(Watch(agent, private, user="nobody").first) == "permission-denied"
    watch = Watch(agent, shared_dir, user="nobody", recursive=True)
    assert watch.first["op"] == "watching"
    assert watch.first["watches"] == 1  # the private subdirectory is not watched
    (shared_dir / "seen").touch()
    assert watch.events(until=1) == [("seen", "create")]
    watch.stop()
    assert _agent_thread_ids(agent.proc.pid) == {("0", "0")}


def test_commands_get_every_signal_at_its_default(tmp_path: Path) -> None:
    """Even when the agent was started with SIGINT, SIGQUIT and SIGTERM ignored (a shell's
    background job; in a guest PID 1 ignores SIGTERM), its commands ignore none of them:
    ``kill PID`` and Ctrl-C reach them."""

    def ignored() -> None:
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, str(AGENT), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=ignored,
    )
    conn = AgentConn(proc)
    try:
        out = conn.exec(["sh", "-c", "grep SigIgn /proc/self/status"]).stdout.decode()
        mask = int(out.split()[1], 16)
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            assert not mask & (1 << (sig - 1)), (sig, out)
    finally:
        stop_agent(proc)


def test_a_new_host_connection_reuses_request_ids_without_losing_older_commands(
    agent: AgentConn, tmp_path: Path
) -> None:
    """After a restore (or an adoption) the new host counts its requests from 1 again:
    a command started by the old one stays in ``ps`` and reachable by pid, its exit is
    not sent as the reply of the new request with its id, and the new request's stream
    is not cut when the old command ends."""
    assert agent.call("hello", version=PROTOCOL_VERSION)["op"] == "hello"
    old_rid = agent.new_id()
    agent.send(old_rid, "exec", argv=["sh", "-c", "sleep 1; echo old"], stdin=False, tag="old")
    old_pid = agent.started(old_rid)["pid"]
    assert agent.call("hello", version=PROTOCOL_VERSION)["op"] == "hello"  # a new host
    # the new host's request has the old one's id
    agent.send(old_rid, "exec", argv=["sh", "-c", "sleep 2; echo new"], stdin=False, tag="new")
    new = agent.started(old_rid)
    assert new["op"] == "started" and new["pid"] != old_pid
    tags = {p["tag"]: p["pid"] for p in agent.call("ps")["processes"]}
    assert tags == {"old": old_pid, "new": new["pid"]}
    result = agent.finish(old_rid, started=new)  # the old command ends first, unheard
    assert result.stdout == b"new\n" and result.exit["exit_code"] == 0
    assert old_pid not in {p["pid"] for p in agent.call("ps")["processes"]}
