"""The console script (``novasandbox_entry``, ``novasandbox_servercli``) without a VM:
what it imports on the server path, its option parsing, and which commands it leaves to
``novasandbox.cli`` (real processes for the last)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import novasandbox_servercli as entry
from novasandbox.sandbox import DEFAULT_LIFETIME

ENTRY = [sys.executable, "-m", "novasandbox_entry"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NOVASANDBOX_")}
    return subprocess.run(
        [*ENTRY, *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def test_the_server_path_imports_neither_the_library_nor_its_dependencies() -> None:
    code = (
        "import sys, novasandbox_entry; from novasandbox_servercli import remote_main; "
        f"status = remote_main(['--server', 'http://127.0.0.1:{_free_port()}', 'ls']); "
        "heavy = {'novasandbox', 'click', 'rich', 'asyncio', 'httpx', 'fastapi'}; "
        "print(status, sorted(heavy & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[0] == "125 []", done
    assert "error [server-unreachable]: cannot reach the server" in done.stderr


def test_a_run_without_stdin_starts_no_thread() -> None:
    """stdin at EOF from the start (/dev/null, an empty file): no stdin stream, so no
    thread and no request but the create and the command (here: server-unreachable)."""
    code = (
        "import sys, novasandbox_entry; from novasandbox_servercli import remote_main; "
        f"status = remote_main(['--server', 'http://127.0.0.1:{_free_port()}', 'run', 'true']); "
        "print(status, 'threading' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split("\n")[0] == "125 False", done


def test_stdin_read_ahead(tmp_path: Path) -> None:
    """What of stdin goes in the command's request: small UTF-8 text at EOF alone; binary,
    large or still open stdin streamed (``more``) after what was there."""
    cases = [
        (b"", (None, b"", False)),
        (b"print(1)\n", ("print(1)\n", b"", False)),
        (b"\xff\x00", (None, b"\xff\x00", True)),
        (b"x" * (entry.INLINE_STDIN + 1), (None, None, True)),
    ]
    for data, (text, head, more) in cases:
        path = tmp_path / "in"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        saved = os.dup(0)
        try:
            os.dup2(fd, 0)
            got = entry._stdin_ahead()
        finally:
            os.dup2(saved, 0)
            os.close(saved)
            os.close(fd)
        assert (got.text, got.more) == (text, more), data[:20]
        if head is not None:
            assert got.head == head
        else:
            assert data.startswith(got.head) and len(got.head) > entry.INLINE_STDIN
    read, write = os.pipe()  # a pipe whose writer is not done: open, nothing read yet
    saved = os.dup(0)
    try:
        os.write(write, b"first\n")
        os.dup2(read, 0)
        got = entry._stdin_ahead()
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read, write):
            os.close(fd)
    assert (got.text, got.head, got.more) == ("first\n", b"", True)


def test_defaults_match_the_library() -> None:
    assert entry.DEFAULT_LIFETIME == DEFAULT_LIFETIME


@pytest.mark.parametrize(
    ("args", "opts", "positional"),
    [
        (["-tpython", "--env=A=1", "-e", "B=2", "ls", "-t"], {"template": "python"}, ["ls", "-t"]),
        (["--cold", "--", "--weird", "x"], {"cold": True}, ["--weird", "x"]),
        (["--network", "nat", "--allow", "a", "--allow=b", "true"], {"network": "nat"}, ["true"]),
    ],
)
def test_run_options_are_parsed_as_click_parses_them(
    args: list[str], opts: dict[str, object], positional: list[str]
) -> None:
    got, rest = entry.RUN_OPTIONS.parse(args, stop_at_positional=True)
    assert rest == positional
    assert {k: v for k, v in got.items() if k in opts} == opts
    if "--env=A=1" in args:
        assert got["env"] == ["A=1", "B=2"]
    if "--allow=b" in args:
        assert got["allow"] == ["a", "b"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout"], "Option '--timeout' requires an argument."),
        (["--bogus", "true"], "No such option: --bogus"),
        (["--cold=1", "true"], "Option '--cold' does not take a value."),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], words: str) -> None:
    with pytest.raises(entry.Usage, match=words):
        entry.RUN_OPTIONS.parse(args, stop_at_positional=True)


def test_remote_paths_and_urls() -> None:
    assert entry._remote_path("sb-1a2b3c4d5e:/tmp/x") == ("sb-1a2b3c4d5e", "/tmp/x")
    assert entry._remote_path("1a2b:rel/x") == ("1a2b", "rel/x")
    assert entry._remote_path("./local:file") is None
    assert entry._remote_path("data.csv") is None
    http = entry.Http("http://[::1]:7070/prefix/", "k")
    assert (http.host, http.port, http.prefix) == ("::1", 7070, "/prefix")
    for bad in ("ftp://x", "127.0.0.1:7070", "http://h:99999"):
        with pytest.raises(entry.Failed) as caught:
            entry.Http(bad, None)
        assert caught.value.code == "invalid-config"


def test_a_usage_error_exits_2_and_nothing_is_sent() -> None:
    port = _free_port()  # nothing listens: a request would be server-unreachable (125)
    done = _run("--server", f"http://127.0.0.1:{port}", "cp", "a", "b")
    assert done.returncode == 2
    assert "Usage: novasandbox cp" in done.stderr and "Error: cp takes FILE ID:PATH" in done.stderr
    done = _run("--server", f"http://127.0.0.1:{port}", "run", "--timeout", "-1", "true")
    assert done.returncode == 2 and "Invalid value for '--timeout'" in done.stderr


def test_what_goes_to_the_local_cli() -> None:
    port = _free_port()
    server = {"NOVASANDBOX_SERVER": f"http://127.0.0.1:{port}"}
    # help: the local CLI's, with or without a server (nothing is contacted)
    done = _run("--server", f"http://127.0.0.1:{port}", "run", "--help")
    assert done.returncode == 0 and "Usage: " in done.stdout and "--lifetime" in done.stdout
    done = _run("exec", "--help", env=server)
    assert done.returncode == 0 and "SANDBOX_ID" in done.stdout
    done = _run("--help")
    assert done.returncode == 0 and "--server URL" in done.stdout and "exec" in done.stdout
    # exec and cp without a server: a typed error
    done = _run("exec", "sb-1", "--", "true")
    assert done.returncode == 125
    assert done.stderr.startswith("error [invalid-config]: exec works through a server")
    done = _run("create", "--label", "a=b")
    assert done.returncode == 125
    assert done.stderr.startswith("error [invalid-config]: create works through a server")
    # --server with a command that is not the server's: a usage error
    done = _run("--server", "http://127.0.0.1:1", "template", "list")
    assert done.returncode == 2 and "--server and --api-key apply to run" in done.stderr
