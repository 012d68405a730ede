"""The CLI as a newcomer meets it (real processes, real VMs): stdin that streams, commands
without ``--``, defaults in ``--help``, errors in CLI terms on one line, the lifetime's end
named, ids by prefix, orphans shown as such."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import assert_no_leftovers
from .test_cli import CLI, cli

pytestmark = pytest.mark.integration


def test_piped_stdin_reaches_the_command(state_root: Path) -> None:
    r = cli("run", "--", "python3", "-", stdin="print(6 * 7)\n")
    assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr
    r = cli("run", "cat", stdin="hello\n")  # and no "--" needed
    assert (r.returncode, r.stdout) == (0, "hello\n"), r.stderr
    r = cli("run", "--no-stdin", "--", "cat", stdin="not passed\n")
    assert (r.returncode, r.stdout) == (0, ""), r.stderr
    assert_no_leftovers(state_root)


def test_stdin_streams_and_is_closed_at_eof(state_root: Path) -> None:
    """Each line comes back before the next is written: nothing waits for EOF."""
    upper = "import sys\nfor line in sys.stdin:\n    print(line.upper(), end='', flush=True)\n"
    proc = subprocess.Popen(
        [*CLI, "run", "--", "python3", "-u", "-c", upper],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for word in ("first", "second", "third"):
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == word.upper() + "\n"
        proc.stdin.close()  # EOF: the loop in the guest ends, so does the command
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    assert_no_leftovers(state_root)


def test_large_stdin_arrives_whole(state_root: Path) -> None:
    data = os.urandom(6 * 1024 * 1024).hex()  # 12 MB of text
    r = cli("run", "--", "sha256sum", stdin=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(data.encode()).hexdigest()
    assert_no_leftovers(state_root)


@pytest.fixture
def tmux() -> Iterator[str]:
    """A real terminal: a detached tmux session of its own, killed at the end."""
    name = f"ns-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def _screen(session: str) -> str:
    return subprocess.run(
        ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
    ).stdout


def _wait_screen(session: str, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = _screen(session)
        if text in screen:
            return screen
        assert time.monotonic() < deadline, f"{text!r} never appeared:\n{screen}"
        time.sleep(0.2)


def _in_terminal(session: str, args: str) -> None:
    env = " ".join(
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("NOVASANDBOX_STATE_DIR", "NOVASANDBOX_CACHE_DIR", "PYTHONPATH", "PATH")
        if k in os.environ
    )
    cmd = f"env {env} {shlex.join(CLI)} {args}; echo EXIT=$?; sleep 600"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True
    )


def test_a_terminal_is_not_read_unless_interactive(tmux: str, state_root: Path) -> None:
    # from a terminal, stdin is not passed on by default: cat reads EOF at once
    _in_terminal(tmux, "run -- cat")
    _wait_screen(tmux, "EXIT=0")
    assert_no_leftovers(state_root)


def test_interactive_passes_the_terminal_on(tmux: str, state_root: Path) -> None:
    _in_terminal(tmux, "run -i -- sed -u s/^/got:/")
    time.sleep(1.0)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "hello", "Enter"], check=True)
    _wait_screen(tmux, "got:hello")
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-d"], check=True)  # EOF
    _wait_screen(tmux, "EXIT=0")
    assert_no_leftovers(state_root)


def test_shell_is_a_real_terminal(tmux: str, state_root: Path) -> None:
    """``novasandbox shell`` in a real terminal (tmux): a login shell as the user, the
    window's size and its changes, Ctrl-C to the guest's program, the exit status."""
    _in_terminal(tmux, "shell")
    _wait_screen(tmux, "user@sb-")  # bash's prompt: the user on the sandbox's host name

    def typed(keys: str, expect: str) -> str:
        subprocess.run(["tmux", "send-keys", "-t", tmux, keys, "Enter"], check=True)
        return _wait_screen(tmux, expect)

    typed("echo $((6 * 7)) $(id -un) $(stty size)", "42 user 50 200")
    subprocess.run(["tmux", "resize-window", "-t", tmux, "-x", "120", "-y", "40"], check=True)
    time.sleep(0.5)
    typed("echo size $(stty size)", "size 40 120")
    typed("sleep 300", "sleep 300")
    time.sleep(1.0)
    subprocess.run(["tmux", "send-keys", "-t", tmux, "C-c"], check=True)
    typed("echo after-$?", "after-130")
    typed("exit 7", "EXIT=7")
    assert_no_leftovers(state_root)


def test_shell_needs_a_terminal(state_root: Path) -> None:
    r = cli("shell", stdin="")  # a pipe, not a terminal
    assert r.returncode == 125 and "needs a terminal" in r.stderr, r.stderr
    assert_no_leftovers(state_root)


def test_options_of_the_command_need_no_double_dash(state_root: Path) -> None:
    r = cli("run", "ls", "-d", "/tmp", "/")  # -d / are ls's, not run's -t
    assert (r.returncode, r.stdout) == (0, "/\n/tmp\n"), r.stderr
    r = cli("run", "-t", "/", "ls")  # a -t meant for ls, before it: say where it goes
    assert r.returncode == 125
    assert "invalid template name '/'" in r.stderr
    assert "put it after the command (novasandbox run -- CMD -t ...)" in r.stderr
    r = cli("run", "--bogus", "true")  # an unknown option before the command: usage error
    assert r.returncode == 2
    assert "No such option '--bogus'" in r.stderr
    assert_no_leftovers(state_root)


def test_run_as_the_templates_user_or_another(state_root: Path) -> None:
    r = cli("run", "--", "sh", "-c", "id -un; pwd")
    assert (r.returncode, r.stdout) == (0, "user\n/home/user\n"), r.stderr
    r = cli("run", "-u", "root", "--", "sh", "-c", "id -un; pwd")
    assert (r.returncode, r.stdout) == (0, "root\n/root\n"), r.stderr
    r = cli("run", "--user", "nosuchuser", "--", "true")
    assert r.returncode == 125 and r.stderr.startswith("error [unknown-user]: "), r.stderr
    r = cli("run", "--user", "Bad User", "--", "true")
    assert r.returncode == 125 and "[invalid-config]" in r.stderr, r.stderr
    assert_no_leftovers(state_root)


def test_help_shows_every_default() -> None:
    r = cli("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for expected in (
        "[default: python]",  # template
        "[default: 300]",  # lifetime
        "[default: none: the sandbox's --lifetime bounds it]",  # command timeout
        "[default: the user's home]",  # cwd
        "[default: the template's: user in python]",  # user
        "[default: the template's, 1]",  # vcpus
        "[default: the template's, 256]",  # memory
        "[default: none]",  # network
        "[default: the public internet]",  # allow
    ):
        assert expected in text, expected


def test_errors_speak_in_flags_on_one_line(state_root: Path) -> None:
    for args, flag, python_name in (
        (["--memory", "10"], "--memory", "memory_mib"),
        (["--vcpus", "99"], "--vcpus", ": vcpus"),
        (["--allow", "1.2.3.4"], "--network nat", 'network="nat"'),
    ):
        r = cli("run", *args, "--", "true")
        assert r.returncode == 125, r.stderr
        assert flag in r.stderr and python_name not in r.stderr, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1, r.stderr  # not wrapped at 80 columns on a pipe
    assert len(lines[0]) > 80  # a long message stayed on its line
    assert_no_leftovers(state_root)


def test_the_end_of_the_lifetime_is_named(state_root: Path) -> None:
    r = cli("run", "--lifetime", "2", "--", "sleep", "60")
    assert r.returncode == 124
    assert "[sandbox-expired]" in r.stderr
    assert "end of its lifetime (2 s)" in r.stderr and "--lifetime" in r.stderr
    assert "set_timeout" not in r.stderr  # the CLI's terms, not the API's
    assert_no_leftovers(state_root)


OWNER = textwrap.dedent(
    """
    import json, sys, time
    from novasandbox import Sandbox
    boxes = [Sandbox.create(timeout=300) for _ in range(int(sys.argv[1]))]
    print(json.dumps([b.id for b in boxes]), flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def owner() -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Another process holding two sandboxes (killed, and its sandboxes reaped, at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, "2"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the owner failed before creating its sandboxes"
    try:
        yield proc, json.loads(line)
    finally:
        proc.kill()
        proc.wait()
        cli("gc")


def test_ids_by_unique_prefix(
    owner: tuple[subprocess.Popen[str], list[str]], state_root: Path
) -> None:
    _, ids = owner
    r = cli("kill", "sb-")  # both match
    assert r.returncode == 125
    assert "[ambiguous-id]" in r.stderr
    assert all(i in r.stderr for i in ids)
    alive = {e["id"] for e in json.loads(cli("ls", "--json").stdout)}
    assert alive == set(ids)  # nothing was killed
    first, second = ids
    short = next(first[:n] for n in range(4, len(first) + 1) if not second.startswith(first[:n]))
    r = cli("kill", short.removeprefix("sb-"))  # without "sb-" too
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"killed {first}"
    r = cli("kill", "sb-zz")
    assert r.returncode == 125
    assert "[sandbox-not-found]" in r.stderr
    assert {e["id"] for e in json.loads(cli("ls", "--json").stdout)} == {second}


def test_a_sandbox_whose_owner_died_is_orphaned(
    owner: tuple[subprocess.Popen[str], list[str]], state_root: Path
) -> None:
    proc, ids = owner
    listed = {e["id"]: e for e in json.loads(cli("ls", "--json").stdout)}
    assert [listed[i]["orphaned"] for i in ids] == [False, False]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = {e["id"]: e for e in json.loads(cli("ls", "--json").stdout)}
    assert [listed[i]["orphaned"] for i in ids] == [True, True]
    assert [listed[i]["state"] for i in ids] == ["running", "running"]  # as recorded
    table = cli("ls").stdout
    assert table.count("orphaned") == 2
    r = cli("gc")
    assert sorted(r.stdout.split()) == sorted(["reaped", "reaped", *ids])
    assert json.loads(cli("ls", "--json").stdout) == []
    assert_no_leftovers(state_root)
