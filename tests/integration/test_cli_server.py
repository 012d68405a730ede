"""The CLI through a server, on real VMs: one ``novasandbox serve --pool python=1``
subprocess for the module (its own state directory, keys made by the CLI), and the CLI
run as the installed console script runs it (``python -m novasandbox_entry``, the
standard-library-only path), each call a new process.

At the end the server is stopped (SIGTERM) and nothing of its sandboxes may be left, the
pooled one included: no QEMU process, no state, no host resource.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox.gc import kill_sandbox
from novasandbox.records import list_sandboxes, sandboxes_dir
from tests.server_support import Server, iter_wait, make_key

from .conftest import qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers

pytestmark = pytest.mark.integration

ENTRY = [sys.executable, "-m", "novasandbox_entry"]


class PooledServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsc-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        self.key = make_key(self.root, "alice")
        self.other_key = make_key(self.root, "bob")
        self.server = Server(self.root, "--pool", "python=1", log=Path(f"{self.root}.log"))
        self.http = self.server.client(self.key)

    def env(self, key: str | None = None, server: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["NOVASANDBOX_SERVER"] = self.server.url if server is None else server
        env["NOVASANDBOX_API_KEY"] = self.key if key is None else key
        return env

    def cli(
        self,
        *args: str,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
        argv: list[str] = ENTRY,
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*argv, *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=env or self.env(),
            timeout=120,
            check=False,
        )

    def pool_ready(self) -> int:
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith('novasandbox_pool_size{template="python"}'):
                return int(float(line.split()[-1]))
        raise AssertionError(f"no pool gauge in:\n{text}")

    def wait_pool_full(self) -> None:
        for _ in iter_wait("the warm pool to fill", limit=120):
            if self.pool_ready() == 1:
                break

    def close(self) -> None:
        try:
            self.http.close()
            self.server.close()
            left = qemu_processes_under(self.root)
            for info in list_sandboxes(self.root):
                kill_sandbox(info.id, self.root)
            assert left == [], f"QEMU processes outlived the server: {left}"
            base = sandboxes_dir(self.root)
            assert not base.is_dir() or list(base.iterdir()) == []
            check_no_leftovers(self.root, self.ids.all())
        finally:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            Path(f"{self.root}.log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pooled() -> Iterator[PooledServer]:
    s = PooledServer()
    try:
        yield s
    finally:
        s.close()


def _err(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stderr.decode(errors="replace")


def test_run_takes_a_pooled_sandbox_and_the_pool_refills(pooled: PooledServer) -> None:
    pooled.wait_pool_full()
    mark = len(pooled.server.events())
    done = pooled.cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert done.returncode == 3, _err(done)
    assert done.stdout == b"out\n" and done.stderr == b"err\n"
    created = [e for e in pooled.server.events()[mark:] if e.get("message") == "sandbox created"]
    assert len(created) == 1 and created[0]["pooled"] is True, created
    # gone for its owner at once (killed in the background), and the pool refills
    assert pooled.http.get("/v1/sandboxes").json() == {"sandboxes": []}
    pooled.wait_pool_full()
    for _ in iter_wait("the run's sandbox to be killed"):
        if created[0]["sandbox"] not in [i.id for i in list_sandboxes(pooled.root)]:
            break

    # a create the pool cannot serve (an environment) is an ordinary one
    r = pooled.http.post("/v1/sandboxes", json={"env": {"A": "1"}, "labels": {"k": "v"}})
    assert r.status_code == 201 and r.json()["pooled"] is False
    assert pooled.pool_ready() == 1
    # one it can: handed over with the create's labels and lifetime, the gauge goes down
    r2 = pooled.http.post("/v1/sandboxes", json={"labels": {"k": "w"}, "timeout": 120})
    got = r2.json()
    assert got["pooled"] is True and got["labels"] == {"k": "w"}, got
    assert got["expires_at"] - got["created_at"] < 125
    assert pooled.pool_ready() == 0
    done = pooled.cli("kill", r.json()["id"], got["id"])
    assert done.returncode == 0, _err(done)
    assert done.stdout.decode().split() == ["killed", r.json()["id"], "killed", got["id"]]


def test_run_stdin_exit_codes_and_errors(pooled: PooledServer) -> None:
    done = pooled.cli("run", "--", "sha256sum", input=b"piped in\n")
    assert done.returncode == 0, _err(done)
    assert done.stdout.split()[0].decode() == hashlib.sha256(b"piped in\n").hexdigest()

    done = pooled.cli("run", "--", "no-such-command")
    assert done.returncode == 127
    assert _err(done).startswith("error [command-not-found]: "), _err(done)

    done = pooled.cli("run", "--timeout", "1", "--", "sleep", "30")
    assert done.returncode == 124
    assert _err(done).startswith("error [command-timeout]: command sleep 30 ran past its"), _err(
        done
    )

    done = pooled.cli("run", "--vcpus", "0", "--", "true")
    assert done.returncode == 125 and "error [invalid-config]: --vcpus" in _err(done), _err(done)
    # nothing left behind by any of them
    assert pooled.http.get("/v1/sandboxes").json() == {"sandboxes": []}


def test_exec_cp_ls_and_kill(pooled: PooledServer, tmp_path: Path) -> None:
    sid = pooled.http.post("/v1/sandboxes", json={"labels": {"job": "cli"}}).json()["id"]
    prefix = sid.removeprefix("sb-")[:6]

    done = pooled.cli("ls")
    assert done.returncode == 0, _err(done)
    header, row = done.stdout.decode().splitlines()
    assert header.split()[:3] == ["id", "template", "state"]
    assert row.split()[:3] == [sid, "python", "running"] and "job=cli" in row
    listed = json.loads(pooled.cli("ls", "--json").stdout)
    assert [s["id"] for s in listed] == [sid]

    done = pooled.cli(
        "exec", prefix, "--", "sh", "-c", "cat; echo to-err >&2; exit 4", input=b"x\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (4, b"x\n", b"to-err\n")
    # as the template's user by default, as another account with -u/--user
    assert pooled.cli("exec", sid, "--", "id", "-un").stdout == b"user\n"
    assert pooled.cli("exec", "-u", "root", sid, "--", "id", "-un").stdout == b"root\n"
    done = pooled.cli("exec", "--user", "nosuchuser", sid, "--", "true")
    assert done.returncode == 125 and _err(done).startswith("error [unknown-user]: "), _err(done)

    blob = os.urandom(1_000_003)
    (tmp_path / "blob.bin").write_bytes(blob)
    os.chmod(tmp_path / "blob.bin", 0o750)
    done = pooled.cli("cp", str(tmp_path / "blob.bin"), f"{sid}:/tmp/")
    assert done.returncode == 0, _err(done)
    done = pooled.cli("exec", sid, "--", "stat", "-c", "%a %s", "/tmp/blob.bin")
    assert done.stdout == b"750 1000003\n", done
    done = pooled.cli("cp", f"{prefix}:/tmp/blob.bin", str(tmp_path / "back.bin"))
    assert done.returncode == 0, _err(done)
    assert (tmp_path / "back.bin").read_bytes() == blob
    done = pooled.cli("cp", "-", f"{sid}:in/stdin.bin", input=blob[:5000])
    assert done.returncode == 0, _err(done)
    done = pooled.cli("cp", f"{sid}:/home/user/in/stdin.bin", "-")
    assert done.returncode == 0 and done.stdout == blob[:5000]

    done = pooled.cli("cp", f"{sid}:/no/such/file", str(tmp_path / "nothing"))
    assert done.returncode == 125 and _err(done).startswith("error [file-not-found]: ")
    assert not (tmp_path / "nothing").exists()
    done = pooled.cli("cp", str(tmp_path / "absent"), f"{sid}:/tmp/x")
    assert done.returncode == 2 and "does not exist" in _err(done)

    # another key does not see it
    done = pooled.cli("exec", sid, "--", "true", env=pooled.env(key=pooled.other_key))
    assert done.returncode == 125
    assert _err(done).startswith(f"error [sandbox-not-found]: no sandbox '{sid}'"), _err(done)

    done = pooled.cli("kill", prefix)
    assert done.returncode == 0 and done.stdout == f"killed {sid}\n".encode(), _err(done)
    done = pooled.cli("exec", sid, "--", "true")
    assert done.returncode == 125 and "[sandbox-not-found]" in _err(done)
    assert pooled.cli("ls", "--json").stdout.strip() == b"[]"


def test_wrong_key_unreachable_server_and_the_cli_module(pooled: PooledServer) -> None:
    mark = len(pooled.server.events())
    done = pooled.cli("run", "--", "true", env=pooled.env(key="nsk_wrong"))
    assert done.returncode == 125
    assert _err(done).startswith("error [unauthorized]: a valid API key is required"), _err(done)
    assert "NOVASANDBOX_API_KEY" in _err(done)
    # nothing created (the pool's refills make sandboxes meanwhile: not counted)
    assert [e for e in pooled.server.events()[mark:] if e.get("message") == "sandbox created"] == []

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = pooled.cli("ls", env=pooled.env(server=f"http://127.0.0.1:{port}"))
    assert done.returncode == 125
    assert _err(done).startswith(
        f"error [server-unreachable]: cannot reach the server at http://127.0.0.1:{port}: "
    ), _err(done)

    # --server/--api-key before the command; through python -m novasandbox.cli too
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVASANDBOX_SERVER")}
    done = pooled.cli(
        "--server",
        pooled.server.url,
        "--api-key",
        pooled.key,
        "run",
        "--",
        "echo",
        "via-cli-module",
        env=env,
        argv=[sys.executable, "-m", "novasandbox.cli"],
    )
    assert done.returncode == 0 and done.stdout == b"via-cli-module\n", _err(done)


def _popen(
    pooled: PooledServer, *args: str, stdin: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*ENTRY, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=pooled.env(),
        # as from a terminal, whatever this test runner inherited (a background job
        # ignores SIGINT, and an ignored signal stays ignored across exec)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _read_line(proc: subprocess.Popen[bytes], limit: float = 60.0) -> bytes:
    """One line of the process's stdout as it comes (fails after ``limit`` seconds, a
    bound on a hang, not on speed)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    deadline = time.monotonic() + limit
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line within {limit} s (so far {line!r})"
        byte = os.read(fd, 1)
        assert byte, f"stdout ended (so far {line!r}); stderr: {proc.communicate()[1]!r}"
        line += byte
    return line


def _guest_processes(pooled: PooledServer, sid: str, name: str) -> int:
    """How many processes named ``name`` the sandbox runs (from /proc)."""
    code = (
        "import os\n"
        "n = 0\n"
        "for p in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try: n += open(f'/proc/{p}/comm').read().strip() == " + repr(name) + "\n"
        "    except OSError: pass\n"
        "print(n)\n"
    )
    done = pooled.cli("exec", "--no-stdin", sid, "--", "python3", "-c", code)
    assert done.returncode == 0, _err(done)
    return int(done.stdout)


def test_create_then_stdin_streams_binary_past_8_mib_cp_and_kill(pooled: PooledServer) -> None:
    done = pooled.cli("create", "--timeout", "600", "--label", "job=stdin", "--json")
    assert done.returncode == 0, _err(done)
    made = json.loads(done.stdout)
    sid = made["id"]
    assert made["labels"] == {"job": "stdin"} and made["state"] == "running", made
    assert 595 < made["expires_at"] - made["created_at"] < 605, made
    done = pooled.cli("create", "--label", "nolabel")
    assert done.returncode == 125, _err(done)
    assert _err(done).startswith("error [invalid-config]: --label takes KEY=VALUE"), _err(done)

    blob = os.urandom(12 << 20) + b"\xff\x00"  # binary, past the old 8 MiB, not UTF-8
    done = pooled.cli("exec", sid, "--", "sh", "-c", "tee /tmp/big | sha256sum", input=blob)
    assert done.returncode == 0, _err(done)
    assert done.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    done = pooled.cli("cp", f"{sid}:/tmp/big", "-")
    assert done.returncode == 0 and done.stdout == blob, _err(done)

    # a small binary stdin that has ended, and an empty one (the command reads EOF)
    done = pooled.cli("exec", sid, "--", "wc", "-c", input=b"\xff\xfe\x00abc")
    assert (done.returncode, done.stdout.strip()) == (0, b"6"), _err(done)
    done = pooled.cli("exec", sid, "--", "wc", "-c", input=b"")
    assert (done.returncode, done.stdout.strip()) == (0, b"0"), _err(done)

    done = pooled.cli("kill", sid)
    assert done.returncode == 0 and done.stdout == f"killed {sid}\n".encode(), _err(done)
    assert pooled.cli("ls", "--json").stdout.strip() == b"[]"


def test_run_python_from_stdin_and_a_stdin_left_open(pooled: PooledServer) -> None:
    done = pooled.cli("run", "--", "python3", "-", input=b"print(6 * 7)\n")
    assert (done.returncode, done.stdout) == (0, b"42\n"), _err(done)

    # stdin stays open: each line's answer comes back before the next is written
    proc = _popen(
        pooled,
        "run",
        "--",
        "sh",
        "-c",
        'while read l; do echo "got $l"; done; echo eof',
        stdin=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        for word in (b"one", b"two"):
            proc.stdin.write(word + b"\n")
            proc.stdin.flush()
            assert _read_line(proc) == b"got " + word + b"\n"
        proc.stdin.close()  # EOF: the loop ends
        assert _read_line(proc) == b"eof\n"
        assert proc.wait(timeout=60) == 0
    finally:
        _reap(proc)
    # a stdin that never ends does not keep the CLI once the command is done
    proc = _popen(pooled, "run", "--", "sh", "-c", 'read l; echo "got $l"', stdin=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"once\n")
        proc.stdin.flush()
        assert _read_line(proc) == b"got once\n"
        assert proc.wait(timeout=60) == 0  # stdin still open
    finally:
        _reap(proc)
    assert pooled.http.get("/v1/sandboxes").json() == {"sandboxes": []}


def test_ctrl_c_kills_the_command_and_runs_sandbox(pooled: PooledServer) -> None:
    ready = "echo ready; exec sleep 60"
    proc = _popen(pooled, "run", "--", "sh", "-c", ready)
    try:
        assert _read_line(proc) == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        _reap(proc)
    assert pooled.http.get("/v1/sandboxes").json() == {"sandboxes": []}

    sid = pooled.cli("create").stdout.decode().strip()
    proc = _popen(pooled, "exec", sid, "--", "sh", "-c", ready)
    try:
        assert _read_line(proc) == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        _reap(proc)
    for _ in iter_wait("the command to be killed"):
        if _guest_processes(pooled, sid, "sleep") == 0:
            break
    assert pooled.http.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"  # exec: not it

    # stdout's reader goes away (| head -1): a quiet exit 1, and the command is killed
    proc = _popen(pooled, "exec", sid, "--", "yes")
    try:
        assert _read_line(proc) == b"y\n"
        assert proc.stdout is not None
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        _reap(proc)
    for _ in iter_wait("yes to be killed"):
        if _guest_processes(pooled, sid, "yes") == 0:
            break
    assert pooled.cli("kill", sid).returncode == 0


def test_shell_in_a_servers_sandbox_in_a_real_terminal(pooled: PooledServer) -> None:
    """``novasandbox shell ID`` through a server, in tmux: a terminal in the server's
    sandbox as the user, resized with the window; the sandbox runs on after ``exit``."""
    sid = pooled.http.post("/v1/sandboxes", json={}).json()["id"]
    session = f"ns-{uuid.uuid4().hex[:8]}"
    env = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in pooled.env().items()
        if k.startswith("NOVASANDBOX_") or k in ("PYTHONPATH", "PATH")
    )
    cmd = f"env {env} {shlex.join(ENTRY)} shell {sid}; echo EXIT=$?; sleep 600"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd], check=True
    )
    try:

        def screen() -> str:
            return subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout

        def wait_screen(text: str) -> None:
            deadline = time.monotonic() + 90
            while text not in (shown := screen()):
                assert time.monotonic() < deadline, f"{text!r} never appeared:\n{shown}"
                time.sleep(0.2)

        wait_screen("user@")
        subprocess.run(
            ["tmux", "send-keys", "-t", session, "echo $((6 * 7)) $(stty size)", "Enter"],
            check=True,
        )
        wait_screen("42 40 160")
        subprocess.run(["tmux", "send-keys", "-t", session, "exit 4", "Enter"], check=True)
        wait_screen("EXIT=4")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    state = pooled.http.get(f"/v1/sandboxes/{sid}").json()["state"]
    assert state == "running"  # an existing sandbox runs on
    pooled.http.delete(f"/v1/sandboxes/{sid}")
